"""W&B sweep files read as grids, so one file runs locally, as a SLURM array or under W&B.

A spec is what ``wandb sweep SPEC.yaml`` reads: ``method: grid``, ``parameters: {dotted.key:
{values: [...]}}`` (or ``{value: x}``) and ``command: [${env}, p4q, run, --config, X,
${args}]``. Grid point ``i`` is the ``i``-th combination of the parameters' values, the first
parameter varying slowest (the order of the file). Its command is the spec's command with
``${args}`` replaced by ``--key=value`` per parameter, the form a W&B agent passes, so the three
ways of running the file give every run the same arguments. Pure functions, no torch.
"""

from __future__ import annotations

import itertools
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_COMMAND = ("${env}", "${interpreter}", "${program}", "${args}")
# the W&B macros this reader understands (wandb's docs: "sweep configuration", command)
ENV, INTERPRETER, PROGRAM, ARGS = "${env}", "${interpreter}", "${program}", "${args}"
ARGS_NO_HYPHENS, ARGS_JSON = "${args_no_hyphens}", "${args_json}"


class SweepSpecError(ValueError):
    """A sweep file this reader cannot run; the message names the problem and the fix."""


@dataclass(frozen=True)
class GridPoint:
    """One run of the sweep: its index and parameter values, in the spec's order."""

    index: int
    values: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        """``model.method=p4q model.quant=w4a4`` (what the progress lines show)."""
        return " ".join(f"{k}={format_value(v)}" for k, v in self.values)

    def args(self) -> list[str]:
        """The ``--key=value`` arguments a W&B agent passes for this point."""
        return [f"--{k}={format_value(v)}" for k, v in self.values]


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file."""

    path: Path
    name: str
    parameters: tuple[tuple[str, tuple[Any, ...]], ...]
    command: tuple[str, ...]
    program: str | None

    @property
    def size(self) -> int:
        n = 1
        for _, values in self.parameters:
            n *= len(values)
        return n

    def points(self) -> list[GridPoint]:
        keys = [k for k, _ in self.parameters]
        combos = itertools.product(*(values for _, values in self.parameters))
        return [GridPoint(i, tuple(zip(keys, c, strict=True))) for i, c in enumerate(combos)]

    def point(self, index: int) -> GridPoint:
        if not 0 <= index < self.size:
            raise SweepSpecError(
                f"--index {index} is outside the grid of {self.path} (0 to {self.size - 1})"
            )
        return self.points()[index]


def format_value(value: Any) -> str:
    """A parameter value as a command-line string (YAML spelling for booleans, None, lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep file (grid only: the local and SLURM forms enumerate it)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise SweepSpecError(f"cannot read sweep file {path} ({err.strerror})") from None
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        raise SweepSpecError(f"{path} is not valid YAML ({detail}); fix its syntax") from None
    if not isinstance(data, dict):
        raise SweepSpecError(f"{path} is not a sweep file: expected a mapping with `parameters`")
    method = data.get("method", "grid")
    if method != "grid":
        raise SweepSpecError(
            f"{path}: method {method!r} cannot be enumerated; use `method: grid` here (random "
            "and bayes sweeps run under `wandb agent` only)"
        )
    raw = data.get("parameters")
    if not isinstance(raw, dict) or not raw:
        raise SweepSpecError(f"{path}: `parameters` must map dotted options to {{values: [...]}}")
    parameters = []
    for key, body in raw.items():
        if isinstance(body, dict) and isinstance(body.get("values"), list) and body["values"]:
            values = tuple(body["values"])
        elif isinstance(body, dict) and "value" in body:
            values = (body["value"],)
        else:
            raise SweepSpecError(
                f"{path}: parameter {key!r} needs `values: [...]` (a non-empty list) or `value: x`"
            )
        parameters.append((str(key), values))
    command = data.get("command", list(DEFAULT_COMMAND))
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        raise SweepSpecError(f"{path}: `command` must be a list of strings")
    if ARGS not in command and ARGS_NO_HYPHENS not in command:
        raise SweepSpecError(f"{path}: `command` must contain ${{args}} to receive the parameters")
    program = data.get("program")
    if PROGRAM in command and not program:
        raise SweepSpecError(f"{path}: `command` uses ${{program}} but no `program` is set")
    return SweepSpec(
        path=path,
        name=str(data.get("name") or path.stem),
        parameters=tuple(parameters),
        command=tuple(command),
        program=str(program) if program else None,
    )


def command(spec: SweepSpec, point: GridPoint, local: bool = True) -> list[str]:
    """The command of ``point``: the spec's, macros filled. ``local``: ``p4q`` (and
    ``lightning``) become this interpreter's ``-m p4q_lightning``, so the sweep uses the same
    environment whatever is on PATH."""
    out: list[str] = []
    for token in spec.command:
        if token == ENV:
            continue  # `/usr/bin/env`: the environment is inherited here
        if token == INTERPRETER:
            out.append(sys.executable if local else "python")
        elif token == PROGRAM:
            out.append(str(spec.program))
        elif token == ARGS:
            out += point.args()
        elif token == ARGS_NO_HYPHENS:
            out += [a.removeprefix("--") for a in point.args()]
        elif token == ARGS_JSON:
            out.append(json.dumps(dict(point.values)))
        else:
            out.append(token)
    if local and out and out[0] in ("p4q", "lightning"):
        out[:1] = [sys.executable, "-m", "p4q_lightning"]
    return out


def run_arguments(cmd: Sequence[str]) -> list[str] | None:
    """The arguments after ``run`` when ``cmd`` is a ``p4q run`` command, else None (then the
    sweep cannot tell a finished run before starting it)."""
    for i, token in enumerate(cmd[:-1]):
        if (
            token == "run"
            and i > 0
            and Path(cmd[i - 1]).name in ("p4q", "p4q_lightning", "lightning")
        ):
            return list(cmd[i + 1 :])
    return None


def shell(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def slurm_script(
    spec: SweepSpec,
    sbatch: Sequence[str] = (),
    max_parallel: int | None = None,
    workdir: str | Path | None = None,
    log_dir: str | Path | None = None,
    group: str | None = None,
) -> str:
    """An ``sbatch`` script whose array task ``i`` runs grid point ``i``; ``sbatch``: cluster
    options (``--partition=gpu``, ``--gres=gpu:1``) written as ``#SBATCH`` lines."""
    throttle = f"%{max_parallel}" if max_parallel else ""
    logs = Path(log_dir) if log_dir else Path("slurm-logs")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={spec.name}",
        f"#SBATCH --array=0-{spec.size - 1}{throttle}",
        f"#SBATCH --output={logs}/%x-%A_%a.out",
        *(f"#SBATCH {opt}" for opt in sbatch),
        "# written by `p4q sweep --slurm`; task i runs grid point i of the sweep file",
        "set -euo pipefail",
    ]
    if workdir is not None:
        lines.append(f"cd {shlex.quote(str(workdir))}")
    lines += [
        f"mkdir -p {shlex.quote(str(logs))}",
        f"export P4Q_SWEEP_GROUP={shlex.quote(group or spec.name)}",
        f'p4q sweep {shlex.quote(str(spec.path))} --index "$SLURM_ARRAY_TASK_ID"',
    ]
    return "\n".join(lines) + "\n"


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(
    done: int, total: int, name: str, status: str, seconds: float, elapsed: float, ran: int
) -> str:
    """``[2/4] model.quant=w4a4: done in 55s | elapsed 1m50s | ETA 1m50s``; the ETA averages
    the runs that ran (skipped ones cost nothing)."""
    left = total - done
    eta = f"{format_seconds(elapsed / ran * left)}" if ran else "?"
    return (
        f"[{done}/{total}] {name}: {status} in {format_seconds(seconds)} | "
        f"elapsed {format_seconds(elapsed)} | ETA {eta if left else '0s'}"
    )
