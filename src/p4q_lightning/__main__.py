"""``python -m p4q_lightning ...``: the same entry as the ``lightning`` and ``p4q`` scripts."""

from p4q_lightning.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
