"""Folder listings read once: a JSON index of a large image tree, rebuilt when it changes.

Listing ImageNet's train folder (1.28 M files) takes minutes on network storage; checking
that every image a split file names exists is the same walk. :func:`list_folder` walks a tree
once and keeps ``{folder: (modification time, sub-folders, files)}`` in a JSON index; the next
start only stats each folder (a few thousand calls) and reuses the index when every folder's
modification time is unchanged. Adding, removing or renaming an entry changes its folder's
modification time, so a changed tree is listed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from p4q_lightning.files import atomic_write

log = logging.getLogger(__name__)

INDEX_FORMAT = 1


@dataclass
class Listing:
    """The non-hidden sub-folders and files of every folder of a tree.

    ``dirs`` maps a folder's path relative to ``root`` (``""`` for the root, ``/``-separated) to
    ``(modification time in ns, sorted sub-folder names, sorted file names joined by newlines)``.
    """

    root: Path
    dirs: dict[str, tuple[int, list[str], str]]
    _file_sets: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)

    def subdirs(self, folder: str = "") -> list[str]:
        """Sorted sub-folder names of ``folder`` (relative to the root); [] when unknown."""
        entry = self.dirs.get(folder)
        return list(entry[1]) if entry else []

    def files(self, folder: str = "") -> list[str]:
        """Sorted file names directly in ``folder``; [] when it is unknown or empty."""
        entry = self.dirs.get(folder)
        return entry[2].split("\n") if entry and entry[2] else []

    def has_dir(self, folder: str) -> bool:
        return folder in self.dirs

    def has_file(self, path: str) -> bool:
        """Whether ``path`` (relative to the root, ``/``-separated) is a listed file."""
        folder, _, name = path.rpartition("/")
        if folder not in self._file_sets:
            if folder not in self.dirs:
                return False
            self._file_sets[folder] = frozenset(self.files(folder))
        return name in self._file_sets[folder]


def list_folder(root: str | os.PathLike[str], index_dir: str | os.PathLike[str] | None) -> Listing:
    """The listing of the tree under ``root``, from the index in ``index_dir`` when it is still
    current, else walked (and the index written; None: no index)."""
    root = Path(root)
    path = index_path(root, index_dir) if index_dir is not None else None
    if path is not None:
        cached = _read_index(path, root)
        if cached is not None:
            log.debug("folder listing of %s from %s", root, path)
            return cached
    listing = Listing(root, _walk(root))
    if path is not None:
        _write_index(path, listing)
    return listing


def index_path(root: Path, index_dir: str | os.PathLike[str]) -> Path:
    """``<index_dir>/<last two folder names>-<hash of the absolute path>.json``."""
    absolute = os.path.abspath(root)
    tail = "-".join(Path(absolute).parts[-2:])
    slug = re.sub(r"[^A-Za-z0-9]+", "-", tail).strip("-")[:60] or "folder"
    digest = hashlib.sha1(absolute.encode()).hexdigest()[:12]
    return Path(index_dir).expanduser() / f"{slug}-{digest}.json"


def _walk(root: Path) -> dict[str, tuple[int, list[str], str]]:
    dirs: dict[str, tuple[int, list[str], str]] = {}
    seen: set[str] = set()  # real paths: a symlink loop is walked once
    pending = [""]
    while pending:
        rel = pending.pop()
        folder = root / rel if rel else root
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        subdirs, files = [], []
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():  # follows symlinks: $DATA folders are often links
                    subdirs.append(entry.name)
                elif entry.is_file():
                    files.append(entry.name)
        subdirs.sort()
        files.sort()
        dirs[rel] = (os.stat(folder).st_mtime_ns, subdirs, "\n".join(files))
        pending.extend(f"{rel}/{d}" if rel else d for d in reversed(subdirs))
    return dirs


def _read_index(path: Path, root: Path) -> Listing | None:
    """The indexed listing if the index exists, is for ``root`` and no folder changed."""
    try:
        payload = json.loads(path.read_text())
        if payload.get("format") != INDEX_FORMAT or payload.get("root") != os.path.abspath(root):
            return None
        dirs = {k: (int(v[0]), list(v[1]), str(v[2])) for k, v in payload["dirs"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    for rel, (mtime, _, _) in dirs.items():
        try:
            if os.stat(root / rel if rel else root).st_mtime_ns != mtime:
                log.info("%s changed since it was indexed; listing it again", root / rel)
                return None
        except OSError:
            return None
    return Listing(root, dirs)


def _write_index(path: Path, listing: Listing) -> None:
    payload = {
        "format": INDEX_FORMAT,
        "root": os.path.abspath(listing.root),
        "dirs": {k: list(v) for k, v in listing.dirs.items()},
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(payload, separators=(",", ":")))
    except OSError as err:  # a read-only cache costs the next start a listing, nothing more
        log.warning("could not write the folder index %s (%s); listing again next time", path, err)
