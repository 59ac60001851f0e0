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
from pathlib import Path

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from p4q_lightning import rundir
from p4q_lightning.callbacks.predictions import PredictionWriter

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
        "group": ident.wandb_group,
        "tags": ident.wandb_tags,
        "job_type": job_type,
    }
    for key, value in defaults.items():
        if args.get(key) is None:
            args[key] = value
    if args.get("id") is None and args.get("version") is None:
        args["id"] = rundir.wandb_run_id(directory, create=create)


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


class RunConfigCallback(SaveConfigCallback):
    """Saves the config into the run directory and logs all of it (model, data, trainer, seed)
    as the loggers' hyper-parameters."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class P4QCLI(LightningCLI):
    """LightningCLI over P4QModule with run directories (see the module docstring)."""

    run_directory: Path | None = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="Directory of this run (default: <trainer.default_root_dir or runs>/<dataset>/"
            "<model>/<method>-<bits>/<shots>shot-seed<seed>).",
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
        checkpoints = os.path.realpath(self.run_directory / "checkpoints")
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = checkpoints
                if callback.save_last is None:
                    callback.save_last = True  # `--ckpt_path last` (resume, test) finds it
        if self.subcommand == "predict" and not any(
            isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks
        ):
            self.trainer.callbacks.append(PredictionWriter())  # predictions.csv in the run dir
