"""Sub-commands of ``p4q`` beyond LightningCLI's: ``export``, ``compare`` and ``demo``.

Each module has ``main(argv) -> int``; ``p4q_lightning.cli`` dispatches to it with the
arguments after the sub-command name.
"""
