"""Pretrained tags that other layers resolve to a weights file (e.g. ``synthetic[:seed]``).

``load_clip`` asks this registry before treating ``pretrained`` as an open_clip tag or a path,
so the model layer loads the demo's teacher without importing the demo (which pretrains it):
``p4q_lightning.demo`` registers its resolver when the package is imported. A leaf module (no
torch), so registering costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable

# A resolver maps a tag to the path of a weights file, or None when the tag is not its own.
Resolver = Callable[[str], "str | None"]

_RESOLVERS: dict[str, Resolver] = {}


def register_pretrained_resolver(name: str, resolver: Resolver) -> None:
    """Let ``resolver`` claim pretrained tags; ``name`` identifies it (registering a name again
    replaces the earlier resolver, so re-imports are harmless)."""
    _RESOLVERS[name] = resolver


def resolve_registered_tag(tag: str) -> str | None:
    """The weights file a registered resolver gives for ``tag``; None when no resolver claims
    it (then it is an open_clip tag or a path)."""
    for resolver in _RESOLVERS.values():
        path = resolver(tag)
        if path is not None:
            return path
    return None
