"""Load a low-bit export as a runnable classifier: :func:`load_lowbit` -> :class:`LowBitCLIP`.

The architecture is rebuilt from open_clip (``load_clip(name, None)`` + ``quantize(spec)``),
then the integer codes are expanded with their scales into exactly the on-grid weights the
fake-quant student multiplied with, so logits match the student's. :meth:`LowBitCLIP.to_int8`
swaps in real integer matrix multiplies for CPU inference.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from p4q_lightning.export import adapters, schema
from p4q_lightning.export.format import (
    ATTENTION_LEAF_VERSION,
    ExportMismatchError,
    read_container,
)
from p4q_lightning.export.packing import unpack_codes
from p4q_lightning.export.writer import ADAPTER, HEAD, STUDENT, weight_key
from p4q_lightning.legacy import upgrade_export_attention_keys
from p4q_lightning.losses import cosine_logits
from p4q_lightning.model.adapter import adapted_image_features
from p4q_lightning.model.clip import load_clip
from p4q_lightning.quant import QuantMultiheadAttention, QuantSpec, quant_modules, quantize

log = logging.getLogger(__name__)

#: what the predict API takes: tensors, PIL images, image paths, or a list of these
Images = Any


class LowBitCLIP(nn.Module):
    """A low-bit CLIP classifier: quantized student, optional adapter, fixed text features.

    ``logits(images) = logit_scale * normalize(adapter(encode_image(images))) @ text_features.T``,
    the P4Q student's image-to-class logits; ``predict`` returns class indices and
    ``predict_names`` class names. ``encode_image``/``encode_text`` expose the quantized towers.
    """

    def __init__(
        self,
        clip: nn.Module,
        classnames: list[str] | None = None,
        text_features: torch.Tensor | None = None,
        logit_scale: torch.Tensor | None = None,
        adapter: nn.Module | None = None,
        prompt_ctx: torch.Tensor | None = None,
        info: dict[str, Any] | None = None,
        preprocess: Any = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.adapter = adapter
        self.classnames = list(classnames or [])
        self.info = dict(info or {})
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.register_buffer("text_features", text_features)
        self.register_buffer("logit_scale", logit_scale)
        self.register_buffer("prompt_ctx", prompt_ctx)
        self.int8 = False

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec.from_dict(self.info["spec"])

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=normalize)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized image features after the adapter (what the classifier compares)."""
        return F.normalize(adapted_image_features(self.clip, self.adapter, images), dim=-1)

    def as_batch(self, images: Images) -> torch.Tensor:
        """A preprocessed ``[N, 3, H, W]`` batch on the model's device from a tensor (``[3, H, W]``
        or ``[N, 3, H, W]``, already preprocessed), a PIL image, an image path, or a list of these.
        """
        if isinstance(images, torch.Tensor):
            batch = images.unsqueeze(0) if images.dim() == 3 else images
        else:
            items = list(images) if isinstance(images, (list, tuple)) else [images]
            if not items:
                raise ValueError("no images given")
            batch = torch.stack([self._one_image(item) for item in items])
        if batch.dim() != 4:
            raise ValueError(f"images must be [N, 3, H, W] or [3, H, W], got {tuple(batch.shape)}")
        ref = self.text_features if self.text_features is not None else self.logit_scale
        return batch.to(ref.device) if ref is not None else batch

    def _one_image(self, item: Any) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            return item
        from p4q_lightning.data.sources import to_rgb  # 16-bit images scaled, not clipped

        if isinstance(item, (str, os.PathLike)):
            from PIL import Image

            with Image.open(item) as opened:
                item = to_rgb(opened, str(item))
        if self.preprocess is None:
            raise ValueError(
                "this model has no preprocess transform: pass preprocessed tensors instead"
            )
        return self.preprocess(to_rgb(item, "the given image") if hasattr(item, "mode") else item)

    @torch.no_grad()
    def logits(self, images: Images) -> torch.Tensor:
        if self.text_features is None:
            raise ValueError(
                "this export has no classifier head (text features); export it with "
                "text_features= and classnames=, or use encode_image/encode_text"
            )
        features = adapted_image_features(self.clip, self.adapter, self.as_batch(images))
        return cosine_logits(features, self.text_features, self.logit_scale)

    @torch.no_grad()
    def predict(self, images: Images) -> torch.Tensor:
        """Class indices of tensors, PIL images or image paths (see :meth:`as_batch`)."""
        return self.logits(images).argmax(dim=-1)

    def predict_names(self, images: Images) -> list[str]:
        """Class names of tensors, PIL images or image paths (see :meth:`as_batch`)."""
        return [self.classnames[i] for i in self.predict(images).tolist()]

    @torch.no_grad()
    def topk(self, images: Images, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per image, the ``k`` most probable classes with their softmax probabilities."""
        probs = self.logits(images).float().softmax(dim=-1)
        scores, top = probs.topk(min(k, probs.shape[-1]), dim=-1)
        return [
            [(self.classnames[j], float(p)) for j, p in zip(idx, sc, strict=True)]
            for idx, sc in zip(top.tolist(), scores.tolist(), strict=True)
        ]

    def to_int8(self) -> LowBitCLIP:
        """Run quantized linears with real int8 matrix multiplies (CPU); returns ``self``."""
        from p4q_lightning.export.int8 import convert_to_int8

        self.clip = convert_to_int8(self.clip)
        if self.adapter is not None:
            self.adapter = convert_to_int8(self.adapter)
        self.int8 = True
        return self


def _attention_owners(target: nn.Module, prefix: str) -> list[str]:
    """The state-dict prefixes of ``target``'s quantized attention modules."""
    return [
        f"{prefix}{name}."
        for name, m in target.named_modules()
        if isinstance(m, QuantMultiheadAttention)
    ]


def _restore(
    target: nn.Module,
    tensors: dict[str, torch.Tensor],
    info: dict[str, Any],
    prefix: str,
    what: str,
) -> dict[str, torch.Tensor]:
    """Expand codes to on-grid weights and check every key and shape against ``target``."""
    expected = target.state_dict()
    state: dict[str, torch.Tensor] = {}
    for full, t in tensors.items():
        if not full.startswith(prefix):
            continue
        key = full[len(prefix) :]
        q = info["quantized"].get(full)
        if q is not None:
            scale_key = (
                f"{prefix}{key.rsplit('.', 1)[0]}.weight_quantizer.scale"
                if "." in key
                else f"{prefix}weight_quantizer.scale"
            )
            codes = unpack_codes(t, q["bits"], q["shape"])
            scale = tensors[scale_key]
            t = codes.float() * scale.view((-1,) + (1,) * (codes.dim() - 1))
        state[key] = t
    for full, z in info.get("zeros", {}).items():
        key = full[len(prefix) :]
        if full.startswith(prefix) and key in expected:
            if list(expected[key].shape) != list(z["shape"]):
                raise ExportMismatchError(
                    f"the export does not fit the {what}: constant buffer {key} has shape "
                    f"{z['shape']} in the file but {list(expected[key].shape)} in the model; "
                    "re-export it from the run"
                )
            state[key] = torch.full(z["shape"], z["value"], dtype=schema.ZERO_DTYPES[z["dtype"]])
        elif full.startswith(prefix):
            state[key] = torch.empty(0)  # reported as unexpected below
    _check_bits(target, info, prefix, what)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} "
                f"vs model {tuple(expected[k].shape)})"
            )
        raise ExportMismatchError(
            f"the export does not fit the {what} rebuilt from its metadata: "
            + "; ".join(parts)
            + ". The file's model name / quant spec disagree with its weights, or it was written "
            "by "
            "a different version; re-export it from the run"
        )
    return state


def _check_bits(target: nn.Module, info: dict[str, Any], prefix: str, what: str) -> None:
    """Every weight the rebuilt spec quantizes must be stored as codes of the same width."""
    want = {
        prefix + weight_key(name, m): m.weight_quantizer.bits
        for name, m in quant_modules(target)
        if m.weight_quantizer.enabled
    }
    have = {k: v["bits"] for k, v in info["quantized"].items() if k.startswith(prefix)}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        k = diff[0]
        raise ExportMismatchError(
            f"the export does not fit the {what} rebuilt from its metadata: its quant spec gives "
            f"{k[len(prefix) :]} {want.get(k, 'float')} bits but the file stores "
            f"{have.get(k, 'float')} ({len(diff)} such weights). The metadata was altered or "
            "written "
            "by a different version; re-export it from the run"
        )


def _check_head_fits(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Text features and prompt context must have the rebuilt towers' widths."""
    text, ctx = tensors.get(HEAD + "text_features"), tensors.get(HEAD + "prompt_ctx")
    projection = getattr(model, "text_projection", None)
    embed = projection.shape[-1] if projection is not None else None
    if text is not None and embed is not None and text.shape[1] != embed:
        raise ExportMismatchError(
            f"the export's text features are {text.shape[1]} wide but the model's embedding is "
            f"{embed}; re-export it from the run"
        )
    width = model.token_embedding.weight.shape[1]
    if ctx is not None and (ctx.dim() not in (2, 3) or ctx.shape[-1] != width):
        raise ExportMismatchError(
            f"the export's prompt context has shape {list(ctx.shape)} but the text tower is "
            f"{width} wide; re-export it from the run"
        )


def _ensure_registered(model_info: dict[str, Any]) -> None:
    """Register the stored open_clip config when this process does not know the model name."""
    name, config = model_info["name"], model_info.get("config")
    if name.startswith("p4q-") or name in open_clip.list_models() or not config:
        return
    directory = Path(tempfile.mkdtemp(prefix="p4q-lowbit-config-"))
    (directory / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(directory / f"{name}.json")


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """open_clip warns on the root logger that a model built without weights is random."""
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def load_lowbit(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    int8: bool = False,
    adapter_factory: Callable[[dict[str, Any]], nn.Module] | None = None,
) -> LowBitCLIP:
    """Load a file written by :func:`export_lowbit` (or ``LowBitExportCallback``, ``p4q export``).

    Verifies the checksum, rebuilds the quantized architecture named in the metadata and fills
    it with the stored integers and float parts. ``int8=True`` converts it for CPU integer
    inference (:meth:`LowBitCLIP.to_int8`). Nothing in the file chooses code: the adapter is a
    registered kind (:data:`~p4q_lightning.export.adapters.ADAPTER_KINDS`) built from validated
    arguments, or ``adapter_factory(init_kwargs)`` builds it. Every field is validated
    (:mod:`~p4q_lightning.export.schema`) because the checksum detects damage, not tampering.
    Raises :class:`LowBitFormatError` for damaged or invalid
    files and :class:`ExportMismatchError` when the weights do not fit the named architecture.
    """
    tensors, info = read_container(path)
    spec = schema.validate(path, tensors, info)
    model_info = info["model"]
    _ensure_registered(model_info)
    with _without_random_init_warning():  # the stored weights replace the random ones below
        clip, preprocess, tokenizer = load_clip(model_info["name"], None)
    student = quantize(clip, spec)
    del clip
    _check_head_fits(student, tensors)
    if int(info.get("format_version", 0)) < ATTENTION_LEAF_VERSION:
        owners = _attention_owners(student, STUDENT)
        tensors = upgrade_export_attention_keys(owners, tensors, info)
    student.load_state_dict(
        _restore(student, tensors, info, STUDENT, f"{model_info['name']} student")
    )
    adapter = None
    if info.get("adapter"):
        adapter = adapters.build(info["adapter"], adapter_factory)
        adapter.load_state_dict(_restore(adapter, tensors, info, ADAPTER, "adapter"))
        adapter.requires_grad_(False)
    model = LowBitCLIP(
        student,
        classnames=info.get("classnames"),
        text_features=tensors.get(HEAD + "text_features"),
        logit_scale=tensors.get(HEAD + "logit_scale"),
        adapter=adapter,
        prompt_ctx=tensors.get(HEAD + "prompt_ctx"),
        info=info,
        preprocess=preprocess,
        tokenizer=tokenizer,
    )
    model.eval().to(device)
    if int8:
        model.to_int8()
    log.info("loaded low-bit %s (%s) from %s", model_info["name"], info["spec"].get("name"), path)
    return model
