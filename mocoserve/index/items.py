"""What an index holds of one image, whatever its format: `Item`, `NewItem`, how a
path is kept in SQLite (`db_path`, `py_path`), and an item's bytes read back (`item_bytes`)."""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass

import numpy as np

from mocoserve.core import tars
from mocoserve.core.errors import UserError

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


class ItemGone(Exception):
    """An item's bytes are no longer the ones embedded (or cannot be read back): why."""


def item_bytes(item: Item) -> bytes:
    """An item's image bytes, exactly the ones embedded: a file's, or a tar member's read at
    its offset in the shard's listing (its index, else its headers). ItemGone, with the
    reason, when the file or shard changed or vanished since embed; never other bytes."""
    where = tars.split_item_key(item.path)
    try:
        if where is None:
            with open(item.path, "rb") as f:
                data = f.read()
        else:
            data = _member_bytes(*where, item)
    except FileNotFoundError:
        raise ItemGone("its file is gone" if where is None else "its tar shard is gone") from None
    except OSError as e:
        raise ItemGone(f"it cannot be read ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != item.sha256:
        raise ItemGone("its bytes changed since embed")
    return data


def _member_bytes(shard: str, member: str, item: Item) -> bytes:
    return member_bytes(shard, member, item.mtime, item.bytes)


def member_bytes(
    shard: str, member: str, mtime: int | None = None, size: int | None = None
) -> bytes:
    """A tar member's bytes at its offset in the shard's listing; ItemGone when the shard is
    not the one embedded (another mtime, given) or no longer holds the member (at `size`)."""
    if shard.startswith(tars.PIPE):
        raise ItemGone("it was streamed from a pipe: shard, which cannot be read back by offset")
    st = os.stat(shard)
    if mtime is not None and st.st_mtime_ns != mtime:  # the shard's mtime at embed
        raise ItemGone("its tar shard changed since embed")
    where = _member_offsets(shard, st.st_size, st.st_mtime_ns).get(member)
    if where is None or (size is not None and where[1] != size):
        raise ItemGone("its tar shard no longer holds it")
    return tars.read_member(shard, *where, member)


@functools.lru_cache(maxsize=64)
def _member_offsets(shard: str, size: int, mtime: int) -> dict[str, tuple[int, int]]:
    """member -> (offset, size) of a shard as it is at (size, mtime): listed once, not per read."""
    try:
        listing = tars.list_shard(shard, labels=False)
    except UserError as e:  # a stale index beside the shard
        raise ItemGone(str(e)) from None
    return {s.member: (s.offset, s.size) for s in listing.samples}
