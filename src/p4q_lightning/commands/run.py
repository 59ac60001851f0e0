"""``p4q run [fit arguments]``: ``fit`` then ``test`` in one process, one run directory.

The unit a sweep, a SLURM array task or a W&B agent executes. It takes ``fit``'s arguments
(``--config``, dotted overrides in either ``--key value`` or ``--key=value`` form), trains, then
tests the trained model it holds in memory (the weights of the last epoch, what ``test
--ckpt_path last`` would load) and writes ``results.json`` (the test metrics and the time each
stage took) into the run directory. A run directory that already holds ``results.json`` is
skipped with one line (``--overwrite true`` runs it again); one that holds an unfinished run
resumes from its ``checkpoints/last.ckpt`` or, without one, starts again. A failure exits 1.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from p4q_lightning import rundir
from p4q_lightning.files import atomic_write
from p4q_lightning.training import frozen_store

log = logging.getLogger(__name__)

RESULTS_FILE = rundir.RESULTS_FILE


class RunFinished(Exception):
    """Raised before anything is built: the run directory already holds the test results."""

    def __init__(self, directory: Path) -> None:
        super().__init__(f"{directory} already holds {RESULTS_FILE}")
        self.directory = directory


class RunResolved(Exception):
    """Raised by a probe (``resolve``) once the arguments are parsed: where the run goes."""

    def __init__(self, directory: Path, finished: bool, config: dict[str, Any]) -> None:
        super().__init__(str(directory))
        self.directory = directory
        self.finished = finished
        self.config = config


def finished(directory: Path) -> bool:
    """Whether ``directory`` holds a completed ``p4q run`` (its test results)."""
    return (Path(directory) / RESULTS_FILE).is_file()


def _run_cli_class(probe: bool) -> type:
    """The P4QCLI subclass that skips finished runs and resumes or restarts unfinished ones
    (``probe``: stop after parsing, raising :class:`RunResolved`)."""
    from p4q_lightning.run_cli import P4QCLI

    class RunCLI(P4QCLI):
        def before_instantiate_classes(self) -> None:
            cfg = self._section()
            directory = rundir.run_directory(cfg.as_dict(), cfg.get("run_dir"))
            done = finished(directory)
            if probe:
                raise RunResolved(directory, done, cfg.as_dict())
            if done and not cfg.get("overwrite"):
                raise RunFinished(directory)
            if not done and cfg.get("ckpt_path") is None and rundir.previous_run(directory):
                last = directory / "checkpoints" / "last.ckpt"
                if last.is_file():
                    log.info("%s holds an unfinished run: resuming it from %s", directory, last)
                    cfg.ckpt_path = str(last)
                else:
                    log.warning("%s holds an unfinished run: starting it again", directory)
                    cfg.overwrite = True
            super().before_instantiate_classes()

    return RunCLI


def _cli(args: Sequence[str], probe: bool) -> Any:
    from p4q_lightning.cli import cli_main, refuse_moved_options
    from p4q_lightning.wandb_mode import resolve_wandb_mode

    refuse_moved_options(args)
    if not probe:
        resolve_wandb_mode()  # before LightningCLI builds a WandbLogger
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return cli_main(["fit", *args], cli_class=_run_cli_class(probe))


def resolve(args: Sequence[str]) -> RunResolved:
    """Parse ``fit`` arguments without building anything: the run directory, whether it is
    finished, and the parsed config (the same parse ``p4q run`` does)."""
    try:
        _cli(args, probe=True)
    except RunResolved as found:
        return found
    raise RuntimeError("the run arguments were parsed but no run directory was resolved")


def run(args: Sequence[str]) -> Path:
    """Fit, test and write ``results.json``; returns the run directory. Raises
    :class:`RunFinished` when the run was already done."""
    start = time.perf_counter()
    cli = _cli(args, probe=False)
    directory = Path(cli.run_directory)
    fit_seconds = time.perf_counter() - start
    if cli.trainer.interrupted or not cli.trainer.state.finished:
        raise RuntimeError(f"the fit in {directory} did not finish: no test")
    start = time.perf_counter()
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    test_seconds = time.perf_counter() - start
    _finish_wandb()
    if cli.trainer.is_global_zero:
        payload = {
            "test": [{k: float(v) for k, v in m.items()} for m in metrics],
            "fit_seconds": round(fit_seconds, 3),
            "test_seconds": round(test_seconds, 3),
            # calibration, teacher text, image features: computed or loaded from the store
            "frozen_seconds": frozen_store.spent(),
        }
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_write(directory / RESULTS_FILE) as tmp:
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
    return directory


def _finish_wandb() -> None:
    """Close the W&B run, so the next run in this process (a sweep) starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


USAGE = """usage: p4q run --config CONFIG [fit arguments ...] [--overwrite true]

fit then test in one process (the unit of a sweep); `p4q fit --help` lists the arguments."""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(__doc__.split("\n\n", 1)[0] + "\n\n" + USAGE + "\n")
        return 0 if args else 2
    try:
        directory = run(args)
    except RunFinished as done:
        sys.stdout.write(f"skipped {done.directory}: finished ({RESULTS_FILE} exists)\n")
        return 0
    sys.stdout.write(f"finished {directory}\n")
    return 0
