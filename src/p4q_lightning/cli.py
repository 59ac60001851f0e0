"""Command-line entry (`lightning`, `p4q`, `python -m p4q_lightning`)."""

from __future__ import annotations


def main() -> None:
    raise SystemExit("p4q_lightning: the CLI is not built yet")
