"""One directory per run, named from what the run is; W&B name, group and tags from the same facts.

Layout (CoOp's precedent): ``<root>/<dataset>/<model>/<method>-<bits>/<shots>shot-seed<seed>/``
where ``root`` is ``trainer.default_root_dir`` (``runs`` when unset). The checkpoint callback,
the loggers, the low-bit export, the comparison and the saved config all write there, so two runs
with different settings never share a file and ``test --ckpt_path last`` finds what ``fit`` wrote.
Pure functions over the plain config dict, so they are testable without building anything.
"""

from __future__ import annotations

import logging
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p4q_lightning.methods import METHODS
from p4q_lightning.synthetic_name import SYNTHETIC, synthetic_world_seed

log = logging.getLogger(__name__)

DEFAULT_ROOT = "runs"
WANDB_ID_FILE = "wandb_id"
FIT_CONFIG = "config.yaml"
# written when a fit completes its first training step: from then on the directory holds a run
TRAINED_MARKER = "trained"
# what a run writes into its directory; `--overwrite true` removes exactly these
RUN_ARTEFACTS = (
    FIT_CONFIG,
    "checkpoints",
    "comparison",
    "model-lowbit.safetensors",
    "predictions.csv",
    WANDB_ID_FILE,
    TRAINED_MARKER,
)
# what only a run that got somewhere writes (a fit that failed before its first step writes none)
RESULT_ARTEFACTS = ("comparison", "model-lowbit.safetensors", "predictions.csv", TRAINED_MARKER)


def slug(text: Any) -> str:
    """A path- and tag-safe name: ``ILSVRC/imagenet-1k`` -> ``imagenet-1k``, ``a:b`` -> ``a-b``."""
    text = str(text).rstrip("/\\")
    text = re.split(r"[/\\]", text)[-1] or "root"
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "unnamed"


@dataclass(frozen=True)
class RunIdentity:
    """The facts that name a run: what was trained on what, how, at which bits and seed."""

    dataset: str
    model: str
    method: str
    bits: str
    shots: int | None
    seed: str

    @property
    def shots_label(self) -> str:
        return f"{self.shots}shot" if self.shots is not None else "allshot"

    def path(self, root: str | Path) -> Path:
        leaf = f"{self.shots_label}-seed{self.seed}"
        return Path(root) / self.dataset / self.model / f"{self.method}-{self.bits}" / leaf

    @property
    def wandb_name(self) -> str:
        return f"{self.method}-{self.bits}-{self.shots_label}-seed{self.seed}"

    @property
    def wandb_group(self) -> str:
        """The experiment: every method and bit width of one dataset, model and shot count."""
        return f"{self.dataset}-{self.model}-{self.shots_label}"

    @property
    def wandb_tags(self) -> list[str]:
        return [
            self.method,
            self.bits,
            self.shots_label,
            f"seed{self.seed}",
            self.dataset,
            self.model,
        ]


FLOAT_BITS = "fp32"


def bits_label(quant_name: str | None) -> str:
    """The one name of a run's bits (run directories, the comparison's ``bits`` column): the
    quantization preset's name, ``fp32`` for a float model (``quant_name`` None)."""
    return FLOAT_BITS if quant_name is None else quant_name


def _bits(model: Mapping[str, Any]) -> str:
    method = model.get("method", "p4q")
    if method in METHODS and not METHODS[method].quantized:
        return bits_label(None)
    quant = model.get("quant", "w8a8")
    name = quant.get("name", "custom") if isinstance(quant, Mapping) else quant
    label = slug(bits_label(name))
    return f"{label}-custom" if model.get("quant_overrides") else label


def _data_args(data: Any) -> dict[str, Any]:
    if isinstance(data, Mapping):
        args = data.get("init_args", data)
        return dict(args) if isinstance(args, Mapping) else {}
    return {}


def dataset_label(dataset: Any, world_seed: int | None = None) -> str:
    """The one name of a dataset in run directories, W&B and ``p4q compare``: its slug, and
    ``synthetic-<world seed>`` for the synthetic world however the config spells it
    (``synthetic:0``, or ``synthetic`` with ``synthetic.world_seed: 0``)."""
    text = str(dataset)
    try:
        seed = synthetic_world_seed(text, default=world_seed or 0)
    except ValueError:  # a malformed synthetic name: the datamodule reports it
        seed = None
    return slug(f"{SYNTHETIC}-{seed}") if seed is not None else slug(text)


def _dataset(data: Any) -> str:
    args = _data_args(data)
    half = args.get("subsample_classes")  # a base-to-novel run is another experiment
    suffix = f"-{half}" if half in ("base", "new") else ""
    if args.get("dataset"):
        synthetic = args.get("synthetic")
        seed = synthetic.get("world_seed") if isinstance(synthetic, Mapping) else None
        return dataset_label(args["dataset"], seed) + suffix
    for key in ("root", "data_dir"):
        if args.get(key):
            return slug(args[key]) + suffix
    class_path = data.get("class_path", "") if isinstance(data, Mapping) else ""
    return slug(class_path.rsplit(".", 1)[-1].lower() or "data")


def _seed(config: Mapping[str, Any]) -> str:
    """``seed_everything`` (the training seed), plus the split seed when the two differ."""
    train = config.get("seed_everything")
    train = train if isinstance(train, int) and not isinstance(train, bool) else None
    split = _data_args(config.get("data")).get("seed")
    if train is None and split is None:
        return "none"
    if train is None or split is None or train == split:
        return str(train if train is not None else split)
    return f"{train}-split{split}"


def identity(config: Mapping[str, Any]) -> RunIdentity:
    """The run's identity from a LightningCLI config (``fit``'s section, as a plain dict)."""
    model = config.get("model") or {}
    shots = _data_args(config.get("data")).get("shots")
    method = str(model.get("method", "p4q"))
    return RunIdentity(
        dataset=_dataset(config.get("data")),
        model=slug(model.get("model_name", "model")),
        method=method,
        bits=_bits(model),
        # the experiment's shots for every method, so its W&B group holds the baselines too
        shots=int(shots) if shots is not None else None,
        seed=_seed(config),
    )


def run_directory(config: Mapping[str, Any], explicit: str | None = None) -> Path:
    """``explicit`` when given, else the layout above under ``trainer.default_root_dir``."""
    if explicit:
        return Path(explicit)
    root = (config.get("trainer") or {}).get("default_root_dir") or DEFAULT_ROOT
    return identity(config).path(root)


def previous_run(directory: Path) -> list[str]:
    """The run artefacts already in ``directory`` (empty: a fresh directory)."""
    return sorted(name for name in RUN_ARTEFACTS if (directory / name).exists())


def got_anywhere(directory: Path, checkpoint_dirs: Sequence[Path] = ()) -> bool:
    """Whether the run in ``directory`` completed a training step or wrote a result (a
    checkpoint, comparison, export or predictions); a fit that failed before its first step
    leaves only its config and W&B id, which do not make a run."""
    dirs = [directory / "checkpoints", *checkpoint_dirs]
    return any((directory / name).exists() for name in RESULT_ARTEFACTS) or any(
        any(Path(d).glob("*.ckpt")) for d in dirs
    )


def mark_trained(directory: Path) -> None:
    """Record that a fit in ``directory`` completed a training step."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TRAINED_MARKER).write_text("a fit completed a training step here\n")


class RunExistsError(RuntimeError):
    """``fit`` into a directory that already holds a run, without resume or overwrite."""


def prepare_fit(
    directory: Path,
    ckpt_path: str | None,
    overwrite: bool,
    checkpoint_dirs: Sequence[Path] = (),
) -> None:
    """Refuse, resume (``ckpt_path``) or overwrite when ``fit`` finds a previous run in
    ``directory``; ``checkpoint_dirs``: where the config's checkpoint callbacks write, besides
    the run's own ``checkpoints/``."""
    found = previous_run(directory)
    if not found:
        return
    if not got_anywhere(directory, checkpoint_dirs):
        log.warning(
            "%s holds only the %s of a fit that never completed a training step: starting it again",
            directory,
            " and ".join(found),
        )
        _remove(directory, found)
        return
    dirs = [directory / "checkpoints", *checkpoint_dirs]
    if ckpt_path == "last" and not any(list(Path(d).glob("last*.ckpt")) for d in dirs):
        raise RunExistsError(
            f"{directory} holds a run but no checkpoints/last.ckpt to resume (was checkpointing "
            "off?): replace the run with `--overwrite true` or pick another `--run_dir`"
        )
    if ckpt_path is not None:
        log.info("resuming the run in %s from %s", directory, ckpt_path)
        return
    if not overwrite:
        raise RunExistsError(
            f"{directory} already holds a run ({', '.join(found)}): resume it with "
            "`--ckpt_path last`, replace it with `--overwrite true`, or change a setting "
            "(or `--run_dir`) to start another"
        )
    log.warning("--overwrite: removing the previous run's %s from %s", ", ".join(found), directory)
    _remove(directory, found)


def _remove(directory: Path, names: Sequence[str]) -> None:
    for name in names:
        path = directory / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def wandb_run_id(directory: Path, create: bool) -> str | None:
    """The W&B run id kept in the run directory, so ``fit`` and the ``test`` after it share one
    W&B run; ``create`` makes one when there is none yet."""
    path = directory / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip() or None
    if not create:
        return None
    run_id = uuid.uuid4().hex[:12]
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id
