"""``P4QCLI``: LightningCLI that gives every run its own directory and its W&B identity.

Before anything is built, the run directory (:mod:`p4q_lightning.rundir`) becomes the trainer's
``default_root_dir``, every logger's unset ``save_dir`` and the checkpoint directory; a W&B
logger gets its name, group, tags, job type and the run id kept in that directory unless the
config sets them. Hyper-parameters are logged once, as the whole config (model, data, trainer,
seed), by :class:`RunConfigCallback`, instead of Lightning merging the module's and the
datamodule's (which fails when an argument such as ``templates`` exists on both sides).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from p4q_lightning import rundir
from p4q_lightning.callbacks.predictions import PredictionWriter
from p4q_lightning.training.checkpointing import AtomicCheckpointIO

log = logging.getLogger(__name__)

# a logger save_dir of None or "." (WandbLogger's default) means "the run directory"
UNSET_DIRS = (None, "", ".")
PREPROCESS_KEYS = ("image_size", "mean", "std", "interpolation")


def _loggers(trainer: Namespace) -> list[Namespace]:
    value = trainer.get("logger")
    items = value if isinstance(value, list) else [value]
    return [v for v in items if isinstance(v, Namespace) and v.get("init_args") is not None]


def _checkpoint_dirs(trainer: Namespace) -> list[Path]:
    """The ``dirpath`` of every ModelCheckpoint the config sets one for."""
    value = trainer.get("callbacks") or []
    items = value if isinstance(value, list) else [value]
    return [
        Path(cb.init_args.dirpath)
        for cb in items
        if isinstance(cb, Namespace)
        and str(cb.get("class_path", "")).endswith("ModelCheckpoint")
        and cb.get("init_args") is not None
        and cb.init_args.get("dirpath")
    ]


def _is_wandb(logger: Namespace) -> bool:
    return str(logger.get("class_path", "")).split(".")[-1] == "WandbLogger"


def _fill_wandb(
    args: Namespace, ident: rundir.RunIdentity, directory: Path, job_type: str, create: bool
) -> None:
    """Name, group, tags, job type and run id from the run, where the config leaves them unset
    (only the first rank creates the id; W&B logs from that rank alone)."""
    defaults = {
        "name": ident.wandb_name,
        "group": rundir.sweep_group() or ident.wandb_group,  # a sweep's runs: one group
        "tags": ident.wandb_tags,
        "job_type": job_type,
    }
    for key, value in defaults.items():
        if args.get(key) is None:
            args[key] = value
    if rundir.agent_run_id():  # a W&B sweep agent made the run: keep its id
        return
    if args.get("id") is None and args.get("version") is None:
        args["id"] = rundir.wandb_run_id(directory, create=create)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"prompt": {"n_ctx": 4}}`` -> ``{"prompt.n_ctx": 4}``."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _model_flags(args: Sequence[str]) -> list[str]:
    """The model options given as command-line flags (``--model.quant w8a8`` -> ``quant``)."""
    return [
        arg.removeprefix("--model.").split("=", 1)[0]
        for arg in args
        if isinstance(arg, str) and arg.startswith("--model.")
    ]


def _fill_preprocess(cfg: Namespace) -> None:
    """Unset data image_size/mean/std/interpolation come from the model's preprocessing config,
    so a SigLIP or a 336-pixel model is fed what it was trained on."""
    data = cfg.get("data")
    args = data.get("init_args") if isinstance(data, Namespace) else None
    if args is None or not all(k in args for k in PREPROCESS_KEYS):
        return
    missing = [k for k in PREPROCESS_KEYS if args.get(k) is None]
    if not missing:
        return
    from p4q_lightning.data.transforms import model_preprocess

    model = cfg.model
    found = model_preprocess(model.model_name, model.get("pretrained"), model.get("model_config"))
    for key in missing:
        value = found[key]
        args[key] = list(value) if isinstance(value, tuple) else value


def _apply_seed(cfg: Namespace) -> None:
    """``--seed N``: the training seed and the datamodule's split seed both become N."""
    seed = cfg.get("seed")
    if seed is None:
        return
    cfg.seed_everything = seed
    data = cfg.get("data")
    args = data.get("init_args") if isinstance(data, Namespace) else None
    if args is not None and "seed" in args:
        args.seed = seed


class RunConfigCallback(SaveConfigCallback):
    """Saves the config into the run directory and logs all of it (model, data, trainer, seed)
    as the loggers' hyper-parameters."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


# Lightning's W&B logger under the names a config may give it
LIGHTNING_WANDB = {
    f"{package}.loggers{module}.WandbLogger"
    for package in ("lightning.pytorch", "pytorch_lightning")
    for module in ("", ".wandb")
}


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` without its deprecated ``anonymous`` argument, which it
    always passes to ``wandb.init`` (as None) and which makes W&B warn "The anonymous setting
    has no effect" on every run. The command line uses it wherever a config names Lightning's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)


class TrainedMarker(Callback):
    """Marks the run directory once the fit completes its first training step (first rank
    only), so a fit that fails before that does not block its own rerun."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.marked = False

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if not self.marked and trainer.is_global_zero:
            rundir.mark_trained(self.directory)
        self.marked = True


class P4QCLI(LightningCLI):
    """LightningCLI over P4QModule with run directories (see the module docstring)."""

    run_directory: Path | None = None
    _requested_model: dict[str, Any] | None = None
    _model_flags: list[str] = []

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, and keep the model options as asked for: with ``--ckpt_path FILE``, LightningCLI
        then replaces them with the checkpoint's (see :meth:`_check_checkpoint_settings`)."""
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        _apply_seed(self.config[sub] if sub else self.config)
        given = args if isinstance(args, (list, tuple)) else sys.argv[1:] if args is None else []
        self._model_flags = _model_flags(given)
        model = (self.config[sub] if sub else self.config).get("model")
        self._requested_model = _flat(model) if model is not None else None

    def _check_checkpoint_settings(self, cfg: Namespace) -> None:
        """A model flag that the loaded checkpoint's settings overrule is refused in one line;
        config-file values the checkpoint overrules are named in one warning."""
        if self._requested_model is None or cfg.get("model") is None:
            return
        now = _flat(cfg.model)
        changed = sorted(
            k
            for k in set(now) | set(self._requested_model)
            if now.get(k) != self._requested_model.get(k)
        )
        if not changed:
            return
        ckpt = cfg.get("ckpt_path")

        def shown(key: str) -> str:
            return f"model.{key}={self._requested_model.get(key)!r} (checkpoint: {now.get(key)!r})"

        flagged = [
            k for k in changed if any(k == f or k.startswith(f + ".") for f in self._model_flags)
        ]
        if flagged:
            raise ValueError(
                f"{', '.join(shown(k) for k in flagged[:4])} conflicts with --ckpt_path {ckpt}: "
                "a checkpoint's model settings are the ones it was trained with and win, so the "
                "flag would be ignored; drop it, or fit a new run with it"
            )
        log.warning(
            "using the model settings of %s, not the config's: %s%s",
            ckpt,
            ", ".join(shown(k) for k in changed[:4]),
            ", ..." if len(changed) > 4 else "",
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="Directory of this run (default: <trainer.default_root_dir or runs>/<dataset>/"
            "<model>/<method>-<bits>/<shots>shot-seed<seed>).",
        )
        parser.add_argument(
            "--seed",
            type=int | None,
            default=None,
            help="CoOp's seed: sets seed_everything and data.init_args.seed (the few-shot split) "
            "together, so one sweep parameter varies both.",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: replace a previous run in the run directory instead of refusing.",
        )

    def _section(self) -> Namespace:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._section()
        self._check_checkpoint_settings(cfg)
        plain = cfg.as_dict()
        directory = rundir.run_directory(plain, cfg.get("run_dir"))
        first_rank = rank_zero_only.rank == 0  # other DDP ranks re-run this: they only read
        if self.subcommand == "fit" and first_rank:
            rundir.prepare_fit(
                directory,
                ckpt_path=cfg.get("ckpt_path"),
                overwrite=cfg.get("overwrite"),
                checkpoint_dirs=_checkpoint_dirs(cfg.trainer),
            )
        self.run_directory = directory
        cfg.trainer.default_root_dir = str(directory)
        cfg.trainer.enable_autolog_hparams = False  # RunConfigCallback logs the whole config
        ident = rundir.identity(plain)
        for logger in _loggers(cfg.trainer):
            args = logger.init_args
            if "save_dir" in args and args.get("save_dir") in UNSET_DIRS:
                args.save_dir = str(directory)
            if _is_wandb(logger):
                if logger.class_path in LIGHTNING_WANDB:
                    logger.class_path = f"{WandbLogger.__module__}.{WandbLogger.__name__}"
                _fill_wandb(
                    args,
                    ident,
                    directory,  # the id lives with the run, wherever W&B writes its files
                    str(self.subcommand or "fit"),
                    create=first_rank,
                )
        _fill_preprocess(cfg)
        name = (
            rundir.FIT_CONFIG
            if self.subcommand in (None, "fit")
            else f"config-{self.subcommand}.yaml"
        )
        self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": name}
        log.info("run directory: %s", directory)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        assert self.run_directory is not None
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # not one the config chose
            strategy.checkpoint_io = AtomicCheckpointIO()
        checkpoints = os.path.realpath(self.run_directory / "checkpoints")
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = checkpoints
                if callback.save_last is None:
                    callback.save_last = True  # `--ckpt_path last` (resume, test) finds it
        if self.subcommand in (None, "fit"):
            self.trainer.callbacks.append(TrainedMarker(self.run_directory))
        if self.subcommand == "predict" and not any(
            isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks
        ):
            self.trainer.callbacks.append(PredictionWriter())  # predictions.csv in the run dir
