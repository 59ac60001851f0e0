"""Pick the Weights & Biases mode before any logger starts, so a run never hangs on W&B.

Used by the command line (before LightningCLI builds loggers) and by ``ComparisonCallback``.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import threading
from urllib.parse import urlparse

log = logging.getLogger(__name__)

__all__ = ["resolve_wandb_mode"]


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = (
        urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        or "api.wandb.ai"
    )
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the W&B server? (DNS included, bounded by ``timeout``)."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(
                (url.hostname or "api.wandb.ai", url.port or 443), timeout=timeout
            ):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def resolve_wandb_mode() -> str:
    """Return the W&B mode to use, setting ``WANDB_MODE=offline`` when online cannot work.

    An explicit ``WANDB_MODE`` wins. Without an API key (env or netrc) or without a connection
    to the server, runs log offline (``wandb sync`` uploads them later) instead of hanging or
    prompting for a login. Call before the first W&B run starts (building the callback does).
    """
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if not _has_wandb_key():
        reason = "no W&B API key (WANDB_API_KEY or `wandb login`)"
    elif not _reachable():
        reason = "the W&B server is unreachable"
    else:
        return "online"
    os.environ["WANDB_MODE"] = "offline"
    log.warning("W&B logs offline: %s; upload later with `wandb sync`", reason)
    return "offline"
