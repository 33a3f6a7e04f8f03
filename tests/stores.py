"""Reading an index's store in tests, whatever its format, without a model."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np

from mocoserve.store import open_store, shards_path


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
    for db in shards_path(index_path).glob("*/items.db"):
        # a read-write connection (reads only): after a writer was killed, its WAL needs a
        # recovery that a read-only connection cannot do (it would miss the whole shard)
        for _ in range(20):
            try:
                with sqlite3.connect(db, timeout=5) as conn:
                    total += conn.execute("SELECT count(*) FROM items").fetchone()[0]
                break
            except sqlite3.OperationalError:  # the file is being made: try again
                time.sleep(0.05)
    return total
