"""Command-line entry: ``lightning``, ``p4q`` and ``python -m p4q_lightning``.

``p4q --help`` lists every command and ``--version`` answers without importing torch.
``fit``/``validate``/``test``/``predict`` (and ``--print_config``) are LightningCLI over
:class:`~p4q_lightning.module.P4QModule` and any LightningDataModule (``data.class_path``).
``export``, ``compare``, ``demo`` and ``import-official`` dispatch to
``p4q_lightning.commands.<name>.main(argv)`` (``-`` read as ``_``), which receives the arguments
after the sub-command name.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from p4q_lightning.wandb_mode import resolve_wandb_mode

log = logging.getLogger(__name__)

SUBCOMMANDS = ("export", "compare", "demo", "import-official")
# every command, in the order the overview lists them, with its one-line summary
COMMANDS = {
    "fit": "train (LightningCLI): fit --config experiments/vitb32_4bit.yaml",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate on the test split; --ckpt_path last finds the fit's run directory",
    "predict": "write predictions.csv (top-5 classes per image) into the run directory",
    "export": "write the low-bit model (packed safetensors, or --format onnx) from a checkpoint",
    "compare": "gather run directories into one table (mean ± std over seeds) and a plot",
    "demo": "the embedded CPU demo: P4Q / PTQ / CoOp on a synthetic world",
    "import-official": "the official P4Q release (--prompt P.pth --adapter A.pth) as a checkpoint",
}
HELP_FLAGS = ("-h", "--help")


def _overview() -> argparse.ArgumentParser:
    """The top-level help and ``--version``, answered without importing torch or Lightning."""
    from p4q_lightning import __version__

    parser = argparse.ArgumentParser(
        prog="p4q",
        usage=f"p4q {{{','.join(COMMANDS)}}} [ARGS]  "
        "(same as `lightning ...` and `python -m p4q_lightning ...`)",
        description="P4Q (Prompt for Quantization) for low-bit open_clip CLIP on PyTorch "
        "Lightning.",
        epilog="commands:\n"
        + "\n".join(f"  {name:<16} {text}" for name, text in COMMANDS.items())
        + "\n\n`p4q COMMAND --help` lists the command's own arguments.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"p4q_lightning {__version__}")
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (redirected, captured), not the one at setup."""

    @property  # type: ignore[override]
    def stream(self):  # type: ignore[no-untyped-def]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # type: ignore[no-untyped-def]
        pass


def _log_to_console() -> None:
    """Show this package's INFO messages (calibration, caching) next to Lightning's own."""
    pkg = logging.getLogger("p4q_lightning")
    if not pkg.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)
        pkg.propagate = False  # one line per message even when the root logger has a handler


def _dispatch(name: str, argv: list[str]) -> int | None:
    module_name = f"p4q_lightning.commands.{name.replace('-', '_')}"
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


def cli_main(  # type: ignore[no-untyped-def]
    args: Sequence[str] | None = None, run: bool = True, cli_class: type | None = None, **kwargs
):
    """Build the LightningCLI (``run=False`` parses and instantiates without running;
    ``cli_class``: a subclass of ``P4QCLI``)."""
    from lightning.pytorch import LightningDataModule

    from p4q_lightning.module import P4QModule
    from p4q_lightning.run_cli import P4QCLI, RunConfigCallback

    # a bad option raises (one `error:` line from main) instead of printing 90 lines of usage
    kwargs.setdefault("parser_kwargs", {"exit_on_error": False})
    return (cli_class or P4QCLI)(
        P4QModule,
        LightningDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        run=run,
        **kwargs,
    )


def main(argv: Sequence[str] | None = None) -> int | None:
    """Entry point; ``argv`` defaults to ``sys.argv[1:]``.

    A failure is one line on stderr and exit status 1; ``P4Q_DEBUG=1`` shows the traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except Exception as err:  # KeyboardInterrupt and SystemExit pass through
        if debug_requested():
            raise
        text = option_error(err, args) if isinstance(err, argparse.ArgumentError) else None
        sys.stderr.write(f"error: {text or one_line(err)}\n(set {DEBUG_ENV}=1 for the traceback)\n")
        return 1


DEBUG_ENV = "P4Q_DEBUG"


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(err: BaseException) -> str:
    """The innermost message of an error chain, on one line (jsonargparse wraps the cause)."""
    while err.__cause__ is not None and not str(err).strip():
        err = err.__cause__
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (KeyError, AttributeError, TypeError, IndexError)):
        text = f"{type(err).__name__}: {text}"
    return text


def _config_files(args: Sequence[str]) -> list[str]:
    files = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--config", "-c")]
    return files + [a.split("=", 1)[1] for a in args if a.startswith("--config=")]


def _known_options() -> list[str]:
    """Dotted names of the model's and trainer's options, for "did you mean" hints."""
    import dataclasses
    import inspect

    from lightning.pytorch import Trainer

    from p4q_lightning.module import P4QModule

    names = []
    for name, param in inspect.signature(P4QModule.__init__).parameters.items():
        names.append(f"model.{name}")
        if dataclasses.is_dataclass(param.default):
            names += [f"model.{name}.{f.name}" for f in dataclasses.fields(param.default)]
    names += [f"trainer.{n}" for n in inspect.signature(Trainer.__init__).parameters]
    return names


def option_error(err: BaseException, args: Sequence[str]) -> str | None:
    """One line for a jsonargparse error (YAML syntax, an unknown or mistyped option, a class
    path that does not import), naming the option, the config file it came from and the fix;
    None when the message has another shape."""
    text = " ".join(str(err).split())
    files = _config_files(args)
    where = f" in {', '.join(files)}" if files else ""
    command = next((a for a in args if not a.startswith("-")), "fit")
    help_hint = f"`p4q {command} --help` lists every option"
    flags = {a.lstrip("-").split("=", 1)[0].replace(".init_args.", ".") for a in args}
    if text.startswith("Problems parsing config"):
        detail = text.split(":", 1)[1].strip().replace('in "<unicode string>", ', "")
        return f"{', '.join(files) or 'the config'} is not valid YAML ({detail}); fix its syntax"
    unknown = re.search(r"(?:does not accept options? '?|unrecognized arguments: )([^' ]+)", text)
    if unknown:
        key = unknown.group(1).lstrip("-")
        close = difflib.get_close_matches(key, _known_options(), n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return (
            f"unknown option {key}{'' if key in flags else where}{hint}; remove or rename it "
            f"({help_hint})"
        )
    keys = re.findall(r'Parser key "([^"]+)"', text)
    if not keys or keys[0] == "config":
        return None
    inner = re.search(
        r"Problem with given class_path '([^']+)': (.*?)(?: - Expected a <class 'NoneType'>|$)",
        text,
    )
    detail = inner.group(2) if inner else text
    expected = list(dict.fromkeys(re.findall(r"Expected a <class '([\w.]+)'>", detail)))
    given = re.search(r"(?:Got value|Given value): (.+?)(?: - |$)", detail)
    key = ".".join(keys) if not inner else ".init_args.".join([keys[0], ".".join(keys[1:])])
    if inner and len(keys) == 1:  # the class itself: a typo in the class path
        return (
            f"{keys[0]}.class_path {inner.group(1)!r} cannot be used ({inner.group(2).strip()})"
            f"{where}; check the module and class name"
        )
    if expected and given:
        wanted = [t for t in expected if t != "NoneType"] or expected
        shown = key.replace(".init_args.", ".")
        return (
            f"option {key} must be {' or '.join(wanted)}, got {given.group(1)}"
            f"{'' if shown in flags else where}; fix the value ({help_hint})"
        )
    return None


def refuse_moved_options(args: Sequence[str]) -> None:
    """A config or flag of the layout before the option groups fails in one line that names
    each option's new place (instead of jsonargparse's usage text)."""
    from p4q_lightning.args import moved_options

    moved: list[tuple[str, str]] = []
    for i, arg in enumerate(args):
        if arg.startswith("--model."):
            moved += moved_options({arg.removeprefix("--model.").split("=", 1)[0]: None})
            continue
        if arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        model = _model_section(path)
        if model is not None:
            moved += moved_options(model)
    if moved:
        names = ", ".join(f"{old} -> {new}" for old, new in moved)
        raise ValueError(
            f"model options are grouped now: {names}; move them (the YAMLs in experiments/ "
            "show the layout)"
        )


def _model_section(path: str) -> dict | None:
    """The model arguments of a YAML config, or None (LightningCLI reports unreadable files)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, dict) and isinstance(model.get("init_args"), dict):
        model = model["init_args"]
    return model if isinstance(model, dict) else None


def _main(argv: Sequence[str] | None) -> int | None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        _overview().print_help(sys.stderr)
        raise SystemExit(2)
    if args[0] in (*HELP_FLAGS, "--version"):
        _overview().parse_args(args[:1])  # prints and exits
    _log_to_console()
    if args and args[0] in SUBCOMMANDS:
        return _dispatch(args[0], args[1:])
    refuse_moved_options(args)
    resolve_wandb_mode()  # before LightningCLI builds a WandbLogger
    cli_main(None if argv is None else args)  # None: LightningCLI reads sys.argv itself
    return None


if __name__ == "__main__":
    main()
