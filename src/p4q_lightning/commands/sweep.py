"""``p4q sweep SPEC.yaml``: run a W&B grid sweep file locally, as a SLURM array, or one point.

- ``p4q sweep SPEC.yaml``: every grid point in turn, each its own process (a failed run is
  reported and the sweep goes on). Finished runs (their directory holds ``results.json``) are
  skipped without starting them, so re-running a finished sweep only checks. One progress line
  per run (n/N, name, status, elapsed, ETA), a summary, then ``p4q compare`` over the sweep's
  run directories into ``--out`` (default ``runs/sweeps/<name>``), where each run's output is
  kept in ``logs/<index>.log``.
- ``--dry-run``: print the commands and stop.
- ``--slurm array.sh``: write an ``sbatch`` script with ``--array=0-(N-1)`` whose task ``i``
  runs ``p4q sweep SPEC.yaml --index i``; ``--sbatch OPTION`` (repeatable) passes cluster
  options through.
- ``--index I``: run grid point ``I`` in this process (what an array task does).
- W&B: ``wandb sweep SPEC.yaml`` then ``wandb agent ID`` runs the same commands.

Every run of one sweep logs to one W&B group (``$P4Q_SWEEP_GROUP``, set here to the sweep's
name; under a W&B agent ``sweep-<sweep id>``).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from p4q_lightning import sweeps
from p4q_lightning.rundir import SWEEP_GROUP_ENV

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p4q sweep",
        description="Run a W&B grid sweep file (method: grid, parameters, command) locally, "
        "as a SLURM array, or one grid point.",
    )
    parser.add_argument("spec", type=Path, help="the sweep file (the one `wandb sweep` reads)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    parser.add_argument("--index", type=int, default=None, help="run only grid point INDEX")
    parser.add_argument("--slurm", type=Path, default=None, help="write an sbatch array script")
    parser.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="an sbatch option for --slurm (repeatable): --sbatch=--partition=gpu",
    )
    parser.add_argument(
        "--max-parallel", type=int, default=None, help="--slurm: at most this many tasks at once"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="logs and report (default runs/sweeps/<name>)"
    )
    return parser


def _group(spec: sweeps.SweepSpec) -> str:
    return os.environ.get(SWEEP_GROUP_ENV, "").strip() or spec.name


def _last_error(path: Path) -> str:
    """The failed run's own one-line error (``error: ...``), else its last line."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    except OSError:
        return "no log"
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


def run_local(spec: sweeps.SweepSpec, out: Path) -> int:
    """Every grid point in turn; returns the number of failed runs."""
    from p4q_lightning.cli import one_line, option_error
    from p4q_lightning.commands import run as run_command

    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, SWEEP_GROUP_ENV: _group(spec)}
    points = spec.points()
    total = len(points)
    start = time.perf_counter()
    ran = skipped = 0
    failed: list[tuple[sweeps.GridPoint, str, Path | None]] = []
    directories: list[Path] = []
    for n, point in enumerate(points, 1):
        cmd = sweeps.command(spec, point)
        args = sweeps.run_arguments(cmd)
        begin = time.perf_counter()
        if args is not None:
            try:
                resolved = run_command.resolve(args)
            except Exception as err:  # a point whose arguments do not parse: report, go on
                text = option_error(err, args) if isinstance(err, argparse.ArgumentError) else None
                failed.append((point, f"error: {text or one_line(err)}", None))
                _progress(n, total, point, "FAILED (arguments)", begin, start, ran)
                continue
            directories.append(resolved.directory)
            overwrite = any(a.startswith("--overwrite") for a in args)
            if resolved.finished and not overwrite:
                skipped += 1
                _progress(n, total, point, "skipped (finished)", begin, start, ran)
                continue
        path = logs / f"{point.index}.log"
        with path.open("w") as handle:
            handle.write(f"$ {sweeps.shell(cmd)}\n")
            handle.flush()
            code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
        ran += 1
        if code != 0:
            failed.append((point, _last_error(path), path))
            status = f"FAILED (exit {code}, log {path})"
        else:
            status = "done"
        _progress(n, total, point, status, begin, start, ran)
    elapsed = sweeps.format_seconds(time.perf_counter() - start)
    sys.stdout.write(
        f"\nsweep {spec.name}: {total} runs, {ran} ran, {skipped} skipped (finished before), "
        f"{len(failed)} failed, in {elapsed}\n"
    )
    for point, error, path in failed:
        where = f" (log {path})" if path is not None else ""
        sys.stdout.write(f"  failed [{point.index}] {point.name}: {error}{where}\n")
    finished = [d for d in directories if run_command.finished(d)]
    if finished:
        from p4q_lightning.commands import compare

        sys.stdout.write("\n")
        compare.main([*map(str, finished), "--out", str(out / "report")])
    return len(failed)


def _progress(
    n: int, total: int, point: sweeps.GridPoint, status: str, begin: float, start: float, ran: int
) -> None:
    now = time.perf_counter()
    line = sweeps.progress_line(n, total, point.name, status, now - begin, now - start, ran)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_index(spec: sweeps.SweepSpec, index: int) -> int:
    """Grid point ``index`` in this process (a SLURM array task)."""
    point = spec.point(index)
    os.environ.setdefault(SWEEP_GROUP_ENV, spec.name)
    cmd = sweeps.command(spec, point)
    args = sweeps.run_arguments(cmd)
    sys.stdout.write(f"[{index + 1}/{spec.size}] {point.name}\n")
    sys.stdout.flush()
    if args is None:
        return subprocess.run(cmd).returncode
    from p4q_lightning.commands import run as run_command

    return run_command.main(args)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        spec = sweeps.load_spec(args.spec)
    except sweeps.SweepSpecError as err:
        parser.error(str(err))
    out = args.out or Path("runs") / "sweeps" / spec.name
    if args.dry_run:
        for point in spec.points():
            sys.stdout.write(sweeps.shell(sweeps.command(spec, point, local=False)) + "\n")
        sys.stdout.write(f"# {spec.size} runs\n")
        return 0
    if args.slurm is not None:
        script = sweeps.slurm_script(
            spec,
            args.sbatch,
            args.max_parallel,
            workdir=Path.cwd(),
            log_dir=out / "slurm",
            group=_group(spec),
        )
        args.slurm.parent.mkdir(parents=True, exist_ok=True)
        args.slurm.write_text(script)
        sys.stdout.write(
            f"wrote {args.slurm}: {spec.size} array tasks; submit with `sbatch {args.slurm}`\n"
        )
        return 0
    if args.index is not None:
        try:
            return run_index(spec, args.index)
        except sweeps.SweepSpecError as err:
            parser.error(str(err))
    return 1 if run_local(spec, out) else 0


if __name__ == "__main__":
    raise SystemExit(main())
