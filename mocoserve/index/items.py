"""What an index holds of one image, whatever its format: `Item`, `NewItem`, and how a
path is kept in SQLite (`db_path`, `py_path`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# the columns an Item is read from (format 1 names the id `id`, format 2 `seq`)
ITEM_COLUMNS = "path, label, sha256, bytes, mtime, width, height"


@dataclass(frozen=True)
class Item:
    """One indexed image."""

    id: int
    path: str
    label: str | None
    sha256: str
    bytes: int
    mtime: int
    width: int
    height: int


@dataclass(frozen=True)
class NewItem:
    """An image about to be added: everything but its id."""

    path: str
    label: str | None
    sha256: str
    bytes: int
    mtime: int
    width: int
    height: int
    vector: np.ndarray


def db_path(path: str) -> str | bytes:
    """A path as SQLite stores it: text, or its exact bytes where it is not valid UTF-8.

    POSIX file names are bytes; Python holds the undecodable ones as surrogate escapes,
    which SQLite's text cannot. A BLOB in the same column keeps them exactly, and equality
    and prefix lookups still work (bytes compare with bytes).
    """
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape")


def py_path(value: str | bytes) -> str:
    """The path a db_path value stands for (the inverse of db_path)."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
