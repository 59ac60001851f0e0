"""``p4q sweep``: one W&B sweep file read as a grid, printed, written as a SLURM array, and the
argument form a W&B agent passes reaching LightningCLI unchanged (fast: nothing is trained)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from jsonargparse import Namespace

from p4q_lightning import rundir, sweeps
from p4q_lightning.cli import main as cli_main
from p4q_lightning.commands import run as run_command

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "sweeps" / "demo.yaml"
SHIPPED = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))


def test_demo_sweep_is_a_2x2_grid_in_the_files_order() -> None:
    spec = sweeps.load_spec(DEMO)
    assert spec.size == 4
    names = [p.name for p in spec.points()]
    assert names == [
        "model.quant=w4a4 seed=0",
        "model.quant=w4a4 seed=1",
        "model.quant=w8a8 seed=0",
        "model.quant=w8a8 seed=1",
    ]
    cmd = sweeps.command(spec, spec.point(1))
    assert cmd[:4] == [sys.executable, "-m", "p4q_lightning", "run"]
    assert cmd[-2:] == ["--model.quant=w4a4", "--seed=1"]  # W&B's ${args} form


def test_dry_run_prints_one_command_per_grid_point(tmp_path, capsys) -> None:
    assert cli_main(["sweep", str(DEMO), "--dry-run", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "# 4 runs"
    assert len(lines) == 5 and all(line.startswith("p4q run --config ") for line in lines[:4])
    assert lines[2].endswith("--model.quant=w8a8 --seed=0")
    assert not any(tmp_path.iterdir())  # nothing run, nothing written


def test_slurm_writes_an_array_script_whose_task_i_runs_point_i(tmp_path, capsys) -> None:
    script = tmp_path / "array.sh"
    code = cli_main(
        ["sweep", str(DEMO), "--slurm", str(script), "--sbatch=--partition=gpu",
         "--sbatch=--gres=gpu:1", "--max-parallel", "2", "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert code == 0
    text = script.read_text()
    assert "#SBATCH --array=0-3%2\n" in text
    assert "#SBATCH --partition=gpu\n#SBATCH --gres=gpu:1\n" in text
    assert f'p4q sweep {DEMO} --index "$SLURM_ARRAY_TASK_ID"' in text
    assert "export P4Q_SWEEP_GROUP=demo\n" in text  # the array's runs: one W&B group
    assert "4 array tasks" in capsys.readouterr().out


@pytest.mark.parametrize("spec", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_sweep_files_parse_as_grids_of_p4q_runs(spec: Path) -> None:
    parsed = sweeps.load_spec(spec)
    assert parsed.size >= 2
    cmd = sweeps.command(parsed, parsed.point(0), local=False)
    args = sweeps.run_arguments(cmd)
    assert args is not None
    configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    configs += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    assert configs  # every config the command names exists in the repo
    for point in parsed.points():
        configs += [str(v) for k, v in point.values if k == "config"]
    for config in configs:
        assert (ROOT / config).is_file(), config


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            "method: bayes\nparameters: {a: {values: [1]}}\ncommand: [p4q, run, '${args}']\n",
            "bayes",
        ),
        ("method: grid\nparameters: {a: {min: 1}}\ncommand: [p4q, run, '${args}']\n", "'a' needs"),
        ("method: grid\nparameters: {a: {values: [1]}}\ncommand: [p4q, run]\n", "${args}"),
        ("method: grid\nparameters: [\n", "not valid YAML"),
    ],
)
def test_bad_sweep_file_fails_in_one_line_naming_the_fix(tmp_path, capsys, body, problem) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(body)
    with pytest.raises(SystemExit):
        cli_main(["sweep", str(spec), "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert problem in err and str(spec) in err


def test_index_outside_the_grid_is_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["sweep", str(DEMO), "--index", "4"])
    assert "--index 4 is outside the grid" in capsys.readouterr().err


def test_agent_argument_form_reaches_lightningcli_unchanged(monkeypatch, tmp_path) -> None:
    """The W&B agent runs the spec's command with ``--key=value``: LightningCLI parses it to the
    same values (and the same run directory) as the space-separated form."""
    spec = sweeps.load_spec(DEMO)
    agent = sweeps.command(spec, spec.point(1), local=False)
    args = sweeps.run_arguments(agent)
    assert "--model.quant=w4a4" in args and "--seed=1" in args
    # the spec's config path is relative to the repository; run directories to the working
    # directory, which must not hold a finished run of this sweep (a checkout where it ran)
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    monkeypatch.chdir(tmp_path)
    found = run_command.resolve(args)
    assert found.config["model"]["quant"] == "w4a4"
    assert found.config["seed_everything"] == 1  # --seed: the training seed and the split's
    assert found.config["data"]["init_args"]["seed"] == 1
    assert found.config["trainer"]["max_epochs"] == 10
    assert found.directory == Path("runs/sweeps/demo/synthetic-0/p4q-tiny/p4q-w4a4/16shot-seed1")
    spaced = [a for arg in args for a in (arg.split("=", 1) if arg.startswith("--") else [arg])]
    assert run_command.resolve(spaced).config == found.config
    assert not found.finished


def test_every_run_of_a_sweep_gets_the_sweep_group(monkeypatch) -> None:
    from p4q_lightning.run_cli import _fill_wandb

    ident = rundir.RunIdentity("synthetic-0", "p4q-tiny", "p4q", "w4a4", 16, "0")
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    monkeypatch.setenv(rundir.SWEEP_GROUP_ENV, "demo")
    args = Namespace(name=None, group=None, tags=None, job_type=None, id=None, version=None)
    _fill_wandb(args, ident, Path("unused"), "fit", create=False)
    assert args.group == "demo"
    # under a W&B agent: the sweep's id names the group, the agent's run id is kept
    monkeypatch.delenv(rundir.SWEEP_GROUP_ENV)
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun")
    args = Namespace(name=None, group=None, tags=None, job_type=None, id=None, version=None)
    _fill_wandb(args, ident, Path("unused"), "fit", create=True)
    assert args.group == "sweep-abc123" and args.id is None
    monkeypatch.delenv("WANDB_SWEEP_ID")
    args = Namespace(name=None, group=None, tags=None, job_type=None, id=None, version=None)
    _fill_wandb(args, ident, Path("unused"), "fit", create=False)
    assert args.group == ident.wandb_group  # outside a sweep: the experiment's group


def _dotted(config: dict, key: str):
    value = config
    for part in key.split("."):
        value = value[part]
    return value


@pytest.mark.slow
@pytest.mark.parametrize("spec", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_sweep_parameters_reach_the_parsed_config(spec: Path, monkeypatch) -> None:
    """Each shipped grid's first and last point parse (as the agent passes them) to configs
    holding the point's values: a parameter a later option would override is caught here."""
    monkeypatch.chdir(ROOT)
    parsed = sweeps.load_spec(spec)
    for point in (parsed.point(0), parsed.point(parsed.size - 1)):
        args = sweeps.run_arguments(sweeps.command(parsed, point, local=False))
        config = run_command.resolve(args).config
        for key, value in point.values:
            if key == "config":
                method = Path(str(value)).stem
                assert config["model"]["method"] == method, (key, value)
            elif key == "seed":
                assert config["seed_everything"] == value == config["data"]["init_args"]["seed"]
            else:
                assert _dotted(config, key) == value, (key, value)


def test_a_point_that_does_not_parse_is_reported_and_the_sweep_goes_on(tmp_path, capsys) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "name: bad\nmethod: grid\nparameters:\n  model.quant: {values: [w4a4, w9a9]}\n"
        f"command: [p4q, run, --config, {ROOT / 'experiments' / 'demo_cpu.yaml'}, "
        f"--run_dir={tmp_path / 'run'}, --model.no_such_option=1, '${{args}}']\n"
    )
    assert cli_main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "[1/2] model.quant=w4a4: FAILED (arguments)" in out
    assert "[2/2] model.quant=w9a9: FAILED (arguments)" in out
    assert "2 runs, 0 ran, 0 skipped (finished before), 2 failed" in out
    assert "unknown option model.no_such_option" in out
