"""``p4q import-official --config C --prompt P.pth --adapter A.pth [--run_dir D]``: the official
P4Q release (github HuixinSun/P4Q_official, ``checkpoints/p4q/``) as a checkpoint of ours.

The release holds two ``torch.save`` pickles, each ``{"model_state_dict": ...}``:

- the prompt learner: ``ctx`` [1, n_ctx, width], one context shared by every class (the
  official ``PromptLearner``, ``prompt_pos=2``: "X ... X name."), plus the fixed
  ``token_prefix`` [n_cls, 1, width] and ``token_suffix`` [n_cls, L, width] embeddings, which
  here only give the class count (our prompt learner embeds its own class names);
- the adapter (``QAdapter(512, reduction=4)``): ``fc.in_fc`` Linear(512 -> 128) and
  ``fc.out_fc`` Linear(128 -> 512), with biases and a ReLU between, blended as
  ``adapt_ratio * A(z) + (1 - adapt_ratio) * z`` with ``adapt_ratio = 0.2`` (the ``main.py``
  default its scripts keep). That is :class:`~p4q_lightning.model.adapter.LowBitAdapter`
  with ``fc1`` = ``in_fc`` and ``fc2`` = ``out_fc``; its quantizer ranges are not in the file.

Both files are read weights-only (a file that needs code to unpickle is refused and nothing in
it runs) and checked against the config before anything is written: context length, width and
class count, adapter widths, finite values; ``module.`` prefixes (DataParallel) are accepted.
The model and datamodule are built from the config (``--model.*``, ``--data.*`` overrides
apply), the tensors loaded, and the student and adapter calibrated by the same
:class:`~p4q_lightning.callbacks.calibration.CalibrationCallback` every run uses (on the first
test batch's start). The run directory (default: beside the config's own runs, named
``official-release``) gets ``checkpoints/official-release.ckpt``, the config and
``imported.json`` (the files' sha256; ``p4q compare`` shows it as the run's origin).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import pickle
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "official-release.ckpt"
ORIGIN_FILE = "imported.json"  # read by `p4q compare` (commands/compare.py)
RUN_LEAF = "official-release"
OFFICIAL_RATIO = 0.2  # main.py: --adapt_ratio default, unchanged by scripts/*.sh
ADAPTER_KEYS = ("fc.in_fc.weight", "fc.in_fc.bias", "fc.out_fc.weight", "fc.out_fc.bias")
OURS = {  # release key -> our state-dict key
    "ctx": "classifier.prompt_learner.ctx",
    "fc.in_fc.weight": "classifier.adapter.fc1.weight",
    "fc.in_fc.bias": "classifier.adapter.fc1.bias",
    "fc.out_fc.weight": "classifier.adapter.fc2.weight",
    "fc.out_fc.bias": "classifier.adapter.fc2.bias",
}


@dataclass(frozen=True)
class Release:
    """The tensors of the two release files, ``module.`` prefixes removed."""

    prompt: dict[str, torch.Tensor]
    adapter: dict[str, torch.Tensor]
    files: dict[str, Path]

    @property
    def ctx(self) -> torch.Tensor:
        """The shared context as our prompt learner holds it: [n_ctx, width]."""
        return self.prompt["ctx"].reshape(self.prompt["ctx"].shape[-2:]).float()

    @property
    def classes(self) -> int | None:
        prefix = self.prompt.get("token_prefix")
        return int(prefix.shape[0]) if prefix is not None else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Our keys for the context and the adapter's weights."""
        out = {OURS["ctx"]: self.ctx}
        out.update({OURS[k]: self.adapter[k].float() for k in ADAPTER_KEYS})
        return out


def read_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The ``model_state_dict`` of one release file, weights-only, ``module.`` prefixes gone."""
    if not path.is_file():
        raise FileNotFoundError(f"the official {what} file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", str(err))
        named = f" ({found.group(1)})" if found else ""
        raise ValueError(
            f"{path} needs code to unpickle{named}, so it was not read and nothing in it ran; "
            f"the official {what} file holds only tensors: check where this file came from"
        ) from err
    except Exception as err:  # a file that is not a torch pickle at all
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise ValueError(
            f"{path} is not a readable torch file ({reason}); pass the release's "
            f"p4q_{'prompt_learner' if what == 'prompt' else 'adapter'}.pth"
        ) from err
    state = payload.get("model_state_dict") if isinstance(payload, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{path} is not in the official layout ({{'model_state_dict': {{...}}}}); pass "
            "the release's file"
        )
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = str(key)
        while name.startswith("module."):  # saved from nn.DataParallel
            name = name[len("module.") :]
        if isinstance(value, torch.Tensor):
            tensors[name] = value
    return tensors


def read_release(prompt: Path, adapter: Path) -> Release:
    """Both files, with the keys and tensor ranks the official code writes."""
    from p4q_lightning.training.checkpointing import check_finite

    prompt_state = read_state(prompt, "prompt")
    adapter_state = read_state(adapter, "adapter")
    ctx = prompt_state.get("ctx")
    if ctx is None or ctx.dim() != 3 or ctx.shape[0] != 1:
        shape = "no 'ctx'" if ctx is None else f"'ctx' of shape {tuple(ctx.shape)}"
        raise ValueError(
            f"{prompt} has {shape}; the official prompt file holds a context [1, n_ctx, width] "
            "shared by all classes"
        )
    missing = [k for k in ADAPTER_KEYS if k not in adapter_state]
    if missing:
        raise ValueError(
            f"{adapter} lacks {', '.join(missing)}; the official adapter file holds "
            f"{', '.join(ADAPTER_KEYS)}"
        )
    damaged = "The file is damaged or not the release's: download it again"
    check_finite(prompt_state, str(prompt), damaged)
    check_finite({k: adapter_state[k] for k in ADAPTER_KEYS}, str(adapter), damaged)
    return Release(prompt_state, adapter_state, {"prompt": prompt, "adapter": adapter})


def check_fits(release: Release, module: Any, classnames: list[str]) -> None:
    """Each way the release and the configured model can disagree, as its own one-line error."""
    hp = module.hparams
    model = module.classifier
    prompt, adapter = module.prompt_args, module.adapter_args
    if hp.method != "p4q" or not adapter.enabled or model.adapter is None:
        raise ValueError(
            f"the release is a P4Q prompt and adapter, but the config trains method={hp.method!r}"
            f" (adapter enabled: {adapter.enabled}); use model.method: p4q with the adapter on"
        )
    if prompt.class_specific or prompt.class_token_position != "end":
        raise ValueError(
            "the release's context is shared by all classes and precedes the class name "
            '("X ... X name."); set model.prompt.class_specific: false and '
            "model.prompt.class_token_position: end"
        )
    n_ctx, width = release.ctx.shape
    if n_ctx != model.prompt_learner.n_ctx:
        raise ValueError(
            f"the release has {n_ctx} context vectors but the config builds "
            f"{model.prompt_learner.n_ctx}; set --model.prompt.n_ctx {n_ctx} (and no ctx_init)"
        )
    if width != model.prompt_learner.embed_dim:
        raise ValueError(
            f"the release's context vectors are {width} wide but {hp.model_name}'s token "
            f"embeddings are {model.prompt_learner.embed_dim}; use the CLIP the release was "
            "trained with (ViT-B/32: --model.model_name ViT-B-32-quickgelu)"
        )
    classes = release.classes
    if classes is not None and classes != len(classnames):
        raise ValueError(
            f"the release was trained for {classes} classes (its token_prefix) but the dataset "
            f"has {len(classnames)}; point data at the dataset it was trained on (CIFAR-100)"
        )
    hidden, dim = release.adapter["fc.in_fc.weight"].shape
    ours_hidden, ours_dim = model.adapter.fc1.weight.shape
    if dim != ours_dim:
        raise ValueError(
            f"the release's adapter takes {dim}-wide image features but {hp.model_name} gives "
            f"{ours_dim}; use the CLIP the release was trained with"
        )
    if hidden != ours_hidden:
        raise ValueError(
            f"the release's adapter has {hidden} hidden units but model.adapter.reduction="
            f"{adapter.reduction} gives {ours_hidden}; set --model.adapter.reduction "
            f"{max(1, dim // max(1, hidden))}"
        )
    shapes = {k: tuple(release.adapter[k].shape) for k in ADAPTER_KEYS}
    expected = {
        "fc.in_fc.bias": (hidden,),
        "fc.out_fc.weight": (dim, hidden),
        "fc.out_fc.bias": (dim,),
    }
    wrong = {k: v for k, v in expected.items() if shapes[k] != v}
    if wrong:
        raise ValueError(
            f"{release.files['adapter']} has "
            + ", ".join(f"{k} of shape {shapes[k]} (expected {v})" for k, v in wrong.items())
        )
    if not adapter.bias:
        raise ValueError("the release's adapter has biases: set model.adapter.bias: true")
    if adapter.ratio != OFFICIAL_RATIO:
        log.warning(
            "the release was trained with the adapter blend %.1f (official --adapt_ratio); this "
            "config uses model.adapter.ratio=%g",
            OFFICIAL_RATIO,
            adapter.ratio,
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _import_cli() -> type:
    from p4q_lightning import rundir
    from p4q_lightning.run_cli import P4QCLI

    class ImportCLI(P4QCLI):
        """P4QCLI whose default run directory is ``official-release`` beside the config's own
        runs, refused when it already holds a run (unless ``--overwrite true``)."""

        def before_instantiate_classes(self) -> None:
            cfg = self._section()
            if not cfg.get("run_dir"):
                own = rundir.run_directory(cfg.as_dict())
                cfg.run_dir = str(own.parent / RUN_LEAF)
            directory = Path(cfg.run_dir)
            found = rundir.previous_run(directory)
            holds_run = rundir.got_anywhere(directory) or (directory / ORIGIN_FILE).exists()
            if holds_run and not cfg.get("overwrite"):
                raise rundir.RunExistsError(
                    f"{directory} already holds a run ({', '.join(found) or ORIGIN_FILE}): "
                    "replace it with `--overwrite true` or pick another `--run_dir`"
                )
            if found:  # what an earlier, failed import left (its W&B id), or --overwrite
                rundir.prepare_fit(directory, ckpt_path=None, overwrite=True)
            (directory / ORIGIN_FILE).unlink(missing_ok=True)
            super().before_instantiate_classes()

    return ImportCLI


def _calibrate(module: Any, datamodule: Any, trainer_template: Any, directory: Path) -> Any:
    """Calibrate the student and the adapter exactly as every run does: CalibrationCallback
    at the start of a test (one batch; its metrics are not the evaluation)."""
    from lightning.pytorch import Trainer

    from p4q_lightning.training.checkpointing import AtomicCheckpointIO

    trainer = Trainer(
        accelerator=trainer_template.accelerator,
        devices=1,
        precision=trainer_template.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_test_batches=1,
        default_root_dir=str(directory),
    )
    trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    trainer.test(module, datamodule=datamodule, verbose=False)
    return trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="p4q import-official",
        description="Turn the official P4Q release (github HuixinSun/P4Q_official, "
        "checkpoints/p4q/) into a checkpoint that `lightning test --config C --ckpt_path "
        "CKPT` evaluates: the prompt context and adapter weights loaded as they are, the "
        "student and adapter ranges calibrated as in every run.",
        epilog="Every other argument goes to the config, as for `lightning test`: --config C "
        "(required), --run_dir D, --overwrite true, --model.*, --data.*, --trainer.accelerator.",
    )
    parser.add_argument("--prompt", type=Path, required=True, help="p4q_prompt_learner.pth")
    parser.add_argument("--adapter", type=Path, required=True, help="p4q_adapter.pth")
    args, rest = parser.parse_known_args(argv)
    if not any(a in ("--config", "-c") or a.startswith("--config=") for a in rest):
        parser.error("--config is required, e.g. experiments/vitb32_p4q_official_cifar100.yaml")
    release = read_release(args.prompt, args.adapter)  # before anything slow is built

    from p4q_lightning.cli import cli_main
    from p4q_lightning.training.checkpointing import check_finite

    cli = cli_main(rest, run=False, cli_class=_import_cli())
    module, datamodule = cli.model, cli.datamodule
    directory = Path(cli.run_directory)
    datamodule.prepare_data()
    if not getattr(datamodule, "classnames", None):  # datamodules that name classes in setup
        datamodule.setup("test")
    classnames = list(datamodule.classnames)
    module.set_classes(classnames, list(getattr(datamodule, "templates", None) or []) or None)
    check_fits(release, module, classnames)
    result = module.load_state_dict(release.state_dict(), strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"release tensors with no place in the model: {result.unexpected_keys}")
    trainer = _calibrate(module, datamodule, cli.trainer, directory)
    ckpt = directory / "checkpoints" / CHECKPOINT_NAME
    trainer.save_checkpoint(ckpt, weights_only=True)
    check_finite(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"], str(ckpt))
    config = cli.parser.dump(cli.config, skip_none=False)
    (directory / "config.yaml").write_text(config)
    origin = {
        "origin": "official P4Q release",
        "files": {
            what: {"path": str(path.resolve()), "sha256": _sha256(path)}
            for what, path in release.files.items()
        },
        "n_ctx": int(release.ctx.shape[0]),
        "classes": len(classnames),
    }
    (directory / ORIGIN_FILE).write_text(json.dumps(origin, indent=2) + "\n")
    config_arg = next(
        (rest[i + 1] for i, a in enumerate(rest[:-1]) if a in ("--config", "-c")),
        next((a.split("=", 1)[1] for a in rest if a.startswith("--config=")), "CONFIG"),
    )
    overridden = any(a.startswith(("--model.", "--data.", "--trainer.")) for a in rest)
    evaluate = (  # the saved config holds the overrides and the run directory
        f"--config {directory / 'config.yaml'} --ckpt_path {ckpt}"
        if overridden
        else f"--config {config_arg} --ckpt_path {ckpt} --run_dir {directory}"
    )
    adapter_shape = release.adapter["fc.in_fc.weight"].shape
    sys.stdout.write(
        f"wrote {ckpt} ({origin['n_ctx']} context vectors, adapter {adapter_shape[1]}->"
        f"{adapter_shape[0]}->{adapter_shape[1]}, {len(classnames)} classes, calibrated)\n"
        f"evaluate it: lightning test {evaluate}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
