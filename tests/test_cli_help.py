"""The command line explains itself: one overview listing every command, ``--version``, both
without importing torch, and a help line of its own for every model and data argument."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import docstring_parser
import pytest

from p4q_lightning import __version__, cli
from p4q_lightning.args import GROUPS
from p4q_lightning.data import FewShotDataModule
from p4q_lightning.data.hub import HubArgs
from p4q_lightning.data.sources import SyntheticArgs
from p4q_lightning.module import P4QModule

PROBE = """
import sys
from p4q_lightning.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("HEAVY" if {"torch", "lightning"} & set(sys.modules) else "LIGHT")
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_overview_lists_every_command_without_importing_torch():
    out = _run("--help")
    assert out.stdout.strip().endswith("LIGHT")
    for command in ("fit", "validate", "test", "predict", "export", "compare", "demo"):
        assert f"\n  {command} " in out.stdout
    assert "--version" in out.stdout


def test_version_without_importing_torch():
    out = _run("--version")
    assert out.stdout.splitlines()[0] == f"p4q_lightning {__version__}"
    assert out.stdout.strip().endswith("LIGHT")


def test_no_command_shows_the_overview_and_fails(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "compare" in capsys.readouterr().err


@pytest.mark.parametrize(
    "cls", [P4QModule, FewShotDataModule, *GROUPS.values(), HubArgs, SyntheticArgs]
)
def test_every_argument_has_its_own_docstring_entry(cls):
    """LightningCLI turns each ``name: text`` docstring entry into that argument's help; an entry
    naming several parameters at once gives none of them a help line."""
    documented = {p.arg_name: p.description for p in docstring_parser.parse(cls.__doc__).params}
    params = set(inspect.signature(cls).parameters)
    assert params <= set(documented), f"undocumented: {sorted(params - set(documented))}"
    assert all(documented[name].strip() for name in params)


def test_fit_help_shows_each_arguments_own_line(capsys):
    with pytest.raises(SystemExit):
        cli.cli_main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--model.optim.prompt_momentum PROMPT_MOMENTUM SGD momentum of the prompt context." in text
    )
    assert "--model.prompt.n_ctx N_CTX number of learned prompt context vectors" in text
    assert "--model.templates+ TEMPLATES override the datamodule's prompt templates" in text
    assert "--run_dir RUN_DIR Directory of this run" in text
