"""Folder listings read once: an index of a large image tree, rebuilt when it changes.

Listing ImageNet's train folder (1.28 M files) takes minutes on network storage; checking
that every image a split file names exists is the same walk. :func:`list_folder` walks a tree
once and keeps ``{folder: (modification time, sub-folders, files)}`` in an index file (a JSON
header, then the file names); the next start only stats each folder (a few thousand calls)
and reuses the index when every folder's modification time is unchanged. Adding, removing or
renaming an entry changes its folder's modification time, so a changed tree is listed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p4q_lightning.files import atomic_write

log = logging.getLogger(__name__)

INDEX_FORMAT = 2


@dataclass
class Listing:
    """The non-hidden sub-folders and files of every folder of a tree.

    ``dirs`` maps a folder's path relative to ``root`` (``""`` for the root, ``/``-separated) to
    ``(modification time in ns, sorted sub-folder names, sorted file names joined by newlines)``
    (the files with the listing's suffixes).
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

    def joined(self, folder: str) -> tuple[str, int]:
        """The file names directly in ``folder`` joined by newlines, and how many there are."""
        entry = self.dirs.get(folder)
        if not entry or not entry[2]:
            return "", 0
        return entry[2], entry[2].count("\n") + 1

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


class PathChunks(Sequence[str]):
    """``prefix + name`` for the files of several folders, built on first access.

    A start that only checks a split file against its dataset (the fingerprint) never builds
    the 1.28 M strings of ImageNet's train folder."""

    def __init__(self) -> None:
        self._chunks: list[tuple[str, str, int]] = []
        self._paths: list[str] | None = None
        self._count = 0

    def add(self, prefix: str, joined: str, count: int) -> None:
        """Add the newline-joined names of one folder (see :meth:`Listing.joined`)."""
        if count:
            self._chunks.append((prefix, joined, count))
            self._count += count
            self._paths = None

    def digest(self) -> str:
        """A hash of every path, in order, without building them."""
        h = hashlib.sha1()
        for prefix, joined, _ in self._chunks:
            h.update(f"{prefix}\0{joined}\0".encode())
        return h.hexdigest()

    def as_list(self) -> list[str]:
        """Every path (built once, then shared)."""
        if self._paths is None:
            self._paths = []
            for prefix, joined, _ in self._chunks:
                self._paths += (prefix + joined.replace("\n", "\n" + prefix)).split("\n")
        return self._paths

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        return self.as_list()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_list())


def list_folder(
    root: str | os.PathLike[str],
    index_dir: str | os.PathLike[str] | None,
    suffixes: tuple[str, ...] | None = None,
) -> Listing:
    """The listing of the tree under ``root``, from the index in ``index_dir`` when it is still
    current, else walked (and the index written; None: no index). ``suffixes``: keep only the
    files whose lower-cased name ends with one of them (None: every file)."""
    root = Path(root)
    kept = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    path = index_path(root, index_dir) if index_dir is not None else None
    if path is not None:
        cached = _read_index(path, root, kept)
        if cached is not None:
            log.debug("folder listing of %s from %s", root, path)
            return cached
    listing = Listing(root, _walk(root, kept))
    if path is not None:
        _write_index(path, listing, kept)
    return listing


def index_path(root: Path, index_dir: str | os.PathLike[str]) -> Path:
    """``<index_dir>/<last two folder names>-<hash of the absolute path>.json``."""
    absolute = os.path.abspath(root)
    tail = "-".join(Path(absolute).parts[-2:])
    slug = re.sub(r"[^A-Za-z0-9]+", "-", tail).strip("-")[:60] or "folder"
    digest = hashlib.sha1(absolute.encode()).hexdigest()[:12]
    return Path(index_dir).expanduser() / f"{slug}-{digest}.index"


def _walk(root: Path, suffixes: tuple[str, ...] | None) -> dict[str, tuple[int, list[str], str]]:
    dirs: dict[str, tuple[int, list[str], str]] = {}
    seen: set[tuple[int, int]] = set()  # (device, inode): a symlink loop is walked once
    top = os.fspath(root)
    pending = [""]
    while pending:
        rel = pending.pop()
        folder = f"{top}/{rel}" if rel else top
        info = os.stat(folder)  # before listing: an entry added meanwhile forces a new listing
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        subdirs, files = [], []
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or "\n" in name:  # names are kept newline-joined
                    continue
                if entry.is_dir():  # follows symlinks: $DATA folders are often links
                    subdirs.append(name)
                elif entry.is_file() and (suffixes is None or name.lower().endswith(suffixes)):
                    files.append(name)
        subdirs.sort()
        files.sort()
        dirs[rel] = (info.st_mtime_ns, subdirs, "\n".join(files))
        pending.extend(f"{rel}/{d}" if rel else d for d in reversed(subdirs))
    return dirs


def _identity(root: Path, suffixes: tuple[str, ...] | None) -> list[Any]:
    return [INDEX_FORMAT, os.path.abspath(root), list(suffixes) if suffixes is not None else None]


def _read_index(path: Path, root: Path, suffixes: tuple[str, ...] | None) -> Listing | None:
    """The indexed listing if the index exists, is for ``root`` and ``suffixes`` and no folder
    changed.

    The file is one JSON line (identity and ``[folder, mtime, sub-folders, length of its
    names]`` per folder) followed by every folder's newline-joined file names back to back:
    the names, most of the file, are sliced out rather than JSON-decoded."""
    try:
        header, _, names = path.read_text().partition("\n")
        payload = json.loads(header)
        if payload.get("identity") != _identity(root, suffixes):
            return None
        dirs: dict[str, tuple[int, list[str], str]] = {}
        offset = 0
        for rel, mtime, subdirs, length in payload["dirs"]:
            dirs[str(rel)] = (int(mtime), list(subdirs), names[offset : offset + length])
            offset += length
        if offset != len(names):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    top = os.fspath(root)
    for rel, (mtime, _, _) in dirs.items():
        try:
            if os.stat(f"{top}/{rel}" if rel else top).st_mtime_ns != mtime:
                log.info("%s changed since it was indexed; listing it again", root / rel)
                return None
        except OSError:
            return None
    return Listing(root, dirs)


def _write_index(path: Path, listing: Listing, suffixes: tuple[str, ...] | None) -> None:
    header = {
        "identity": _identity(listing.root, suffixes),
        "dirs": [
            [rel, m, subdirs, len(names)] for rel, (m, subdirs, names) in listing.dirs.items()
        ],
    }
    text = json.dumps(header, separators=(",", ":")) + "\n"
    text += "".join(names for _, _, names in listing.dirs.values())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            tmp.write_text(text)
    except OSError as err:  # a read-only cache costs the next start a listing, nothing more
        log.warning("could not write the folder index %s (%s); listing again next time", path, err)
