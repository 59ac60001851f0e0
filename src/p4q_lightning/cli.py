"""Command-line entry: ``lightning``, ``p4q`` and ``python -m p4q_lightning``.

``fit``/``validate``/``test``/``predict`` (and ``--print_config``) are LightningCLI over
:class:`~p4q_lightning.module.P4QModule` and any LightningDataModule (``data.class_path``).
``export``, ``compare`` and ``demo`` dispatch to ``p4q_lightning.commands.<name>.main(argv)``,
which receives the arguments after the sub-command name.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

from p4q_lightning.wandb_mode import resolve_wandb_mode

log = logging.getLogger(__name__)

SUBCOMMANDS = ("export", "compare", "demo")


def _log_to_console() -> None:
    """Show this package's INFO messages (calibration, caching) next to Lightning's own."""
    pkg = logging.getLogger("p4q_lightning")
    if not pkg.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)
        pkg.propagate = False  # one line per message even when the root logger has a handler


def _dispatch(name: str, argv: list[str]) -> int | None:
    module_name = f"p4q_lightning.commands.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name in (module_name, "p4q_lightning.commands"):
            raise SystemExit(
                f"p4q {name}: this command is not available yet in this version of p4q_lightning "
                f"({module_name} is not installed)"
            ) from None
        raise
    return module.main(argv)


def cli_main(args: Sequence[str] | None = None, run: bool = True, **kwargs):  # type: ignore[no-untyped-def]
    """Build the LightningCLI (``run=False`` parses and instantiates without running)."""
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningCLI

    from p4q_lightning.module import P4QModule

    return LightningCLI(
        P4QModule,
        LightningDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        run=run,
        **kwargs,
    )


def main(argv: Sequence[str] | None = None) -> int | None:
    """Entry point; ``argv`` defaults to ``sys.argv[1:]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        return _dispatch(args[0], args[1:])
    _log_to_console()
    resolve_wandb_mode()  # before LightningCLI builds a WandbLogger
    cli_main(None if argv is None else args)  # None: LightningCLI reads sys.argv itself
    return None


if __name__ == "__main__":
    main()
