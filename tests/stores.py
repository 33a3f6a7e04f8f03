"""Reading an index's store in tests, whatever its format, without a model."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from mocoserve.index.files import IndexFiles
from mocoserve.index.formats import open_store


def rows(index_path: Path) -> dict[str, tuple]:
    """path -> (id, label, sha256, vector) for every item."""
    store = open_store(index_path)
    try:
        out = {}
        for ids, vectors in store.vectors():
            items = store.items(ids)
            for i, v in zip(ids, vectors, strict=True):
                item = items[int(i)]
                out[item.path] = (item.id, item.label, item.sha256, np.array(v))
        return out
    finally:
        store.close()


def failures(index_path: Path) -> dict[str, str]:
    store = open_store(index_path)
    try:
        return dict(store.failures())
    finally:
        store.close()


def committed(index_path: Path) -> int:
    """Items committed so far, read straight from the shard files (a writer may be running)."""
    total = 0
    for db in IndexFiles(index_path).shards.glob("*/items.db"):
        # read-only first; after a writer was killed mid-commit its hot journal needs a
        # recovery that only a read-write connection does. A shard locked by a live (or
        # frozen) writer is skipped: callers poll.
        for uri in (f"file:{db}?mode=ro", f"file:{db}"):
            try:
                with sqlite3.connect(uri, uri=True, timeout=1) as conn:
                    total += conn.execute("SELECT count(*) FROM items").fetchone()[0]
                break
            except sqlite3.OperationalError:
                continue
    return total
