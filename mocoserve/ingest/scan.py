"""The reader stage's interface, `ImageSource`, and the folder source that implements it.

A source answers two questions. What items are there, with the facts a rerun compares
(`scan`: a key, a label, a size and an mtime, nothing decoded)? And where are the bytes of
the items still to embed (`read`: in the order asked)? Items are named by their key, which
is what the index stores as the item's path: a file's absolute path for a folder, the
shard's path and the member's name for a tar shard (`tar:<shard>//<member>`, see
`mocoserve.ingest.tarsource`). A source's `roots` are the
key prefixes it covers: a stored item under them that a scan no longer finds is removed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mocoserve.core.decode import ByteRange
from mocoserve.core.errors import UserError
from mocoserve.core.files import path_text
from mocoserve.core.images import iter_image_files
from mocoserve.ingest.timing import StageTime


@dataclass(frozen=True)
class FoundFile:
    """One item's facts, as a scan finds them (`path` is the item's key)."""

    path: str
    label: str | None
    bytes: int
    mtime: int


@dataclass(frozen=True)
class SourceItem:
    """An item to embed: its key, its bytes or the path of a file holding them, its facts."""

    key: str
    # a file (str) or a byte range of one (a tar member) that a decoder process reads itself,
    # no bytes through a pipe; bytes: what a stream handed over
    data: bytes | str | ByteRange
    facts: FoundFile


class ImageSource(Protocol):
    """The reader stage: an image folder (`FolderSource`) or tar shards (`TarSource`)."""

    time: StageTime  # listing and stat'ing (`scan`), reading (`read`)
    failures: list[tuple[str, str]]  # (key, reason) found wrong while listing (a cut tar)

    @property
    def roots(self) -> list[str]:
        """The key prefixes this source covers (what a rerun may find gone)."""
        ...

    def scan(self, keep: Callable[[str], bool] | None = None) -> list[FoundFile]:
        """Every item's facts, each once, in order; `keep(key)` picks them before any stat."""
        ...

    def read(self, found: Iterable[FoundFile]) -> Iterator[SourceItem]:
        """These items (from `scan`), ready to decode, in the order given."""
        ...


def scan(
    roots: Sequence[str | Path],
    labels_from_folders: bool,
    keep: Callable[[str], bool] | None = None,
) -> list[FoundFile]:
    """Image files under the roots (a root may also be one file), each once, in order.

    `keep(path)` picks the files of this process's shards before they are stat'ed, so a
    process of many reads the size and mtime of its own files only.
    """
    found: dict[str, FoundFile] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise UserError(f"{root} does not exist")
        files = [root] if root.is_file() else iter_image_files(root)
        for file in files:
            path = os.path.abspath(file)
            if path in found or (keep is not None and not keep(path)):
                continue
            label = None
            if labels_from_folders and root.is_dir():
                parts = Path(file).relative_to(root).parts
                # ImageFolder: the top-level folder; its name as text (a label is TEXT in
                # SQLite and a string in JSON: bytes that are not UTF-8 as \xNN)
                label = path_text(parts[0]) if len(parts) > 1 else None
            try:
                st = os.stat(path)
            except OSError:
                continue  # vanished between listing and stat
            found[path] = FoundFile(path, label, st.st_size, st.st_mtime_ns)
    return list(found.values())


class FolderSource:
    """Image folders (or single files): an item is a file, its key the absolute path."""

    def __init__(self, roots: Sequence[str | Path], labels_from_folders: bool = False) -> None:
        self.paths = list(roots)
        self.labels_from_folders = labels_from_folders
        self.time = StageTime()
        self.failures: list[tuple[str, str]] = []  # a file that cannot be read fails in decode

    @property
    def roots(self) -> list[str]:
        return [os.path.abspath(r) for r in self.paths]

    def scan(self, keep: Callable[[str], bool] | None = None) -> list[FoundFile]:
        started = time.perf_counter()
        found = scan(self.paths, self.labels_from_folders, keep)
        self.time.add(started, len(found))
        return found

    def read(self, found: Iterable[FoundFile]) -> Iterator[SourceItem]:
        """Each file's path: its decoder process reads the bytes (nothing to time here)."""
        for f in found:
            yield SourceItem(f.path, f.path, f)


def listed_files(paths: Sequence[str], labels: Sequence[str | None]) -> list[SourceItem]:
    """Named files with their labels, unscanned (size and mtime are read when decoded)."""
    return [
        SourceItem(p, p, FoundFile(p, label, 0, 0)) for p, label in zip(paths, labels, strict=True)
    ]
