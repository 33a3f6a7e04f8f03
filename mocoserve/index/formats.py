"""An index in either format: format 1 read and migrated, format 2 opened (`open_store`).

Format 1, the sidecar (`out.faiss.db`): one row per embedded image, its vector too. Indexes
made before the sharded layout (`mocoserve.index.store`, format 2) keep everything there;
they still open and search through `Sidecar`, and `mocoserve index migrate` (or the next
`embed`) moves them to format 2 without re-embedding (`migrate`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from mocoserve.core.errors import UserError
from mocoserve.core.files import fsync_dir
from mocoserve.index.catalog import FORMAT_VERSION, CatalogMeta, catalog_damage
from mocoserve.index.dbfile import DbFile, format_version
from mocoserve.index.files import DamagedIndex, IndexFiles
from mocoserve.index.items import ITEM_COLUMNS, Item, NewItem, db_path, py_path
from mocoserve.index.store import Shard, ShardedStore

SIDECAR_FORMAT_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: an id names one vector
    path TEXT NOT NULL UNIQUE,
    label TEXT,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    mtime INTEGER NOT NULL,   -- st_mtime_ns
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    vector BLOB NOT NULL      -- float32 x dim, L2-normalised
);
CREATE INDEX IF NOT EXISTS items_sha256 ON items(sha256);
CREATE TABLE IF NOT EXISTS failures (path TEXT PRIMARY KEY, error TEXT NOT NULL);
"""


class Sidecar(DbFile):
    """The `items`, `failures` and `meta` tables of a format-1 index (vectors inside)."""

    what = "sidecar"

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        super().__init__(path, _SCHEMA, readonly)
        if not self.has_table("items"):
            raise UserError(f"{self.path} is not a format-1 mocoserve sidecar")
        version = self.get_meta("format_version")
        if version is None and not readonly:
            self.set_meta({"format_version": str(SIDECAR_FORMAT_VERSION)})
        elif version is not None and int(version) > SIDECAR_FORMAT_VERSION:
            raise UserError(f"{self.path} is a version {version} sidecar; upgrade mocoserve")

    # items
    def __len__(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM items").fetchone()[0])

    def stats(self) -> dict[str, tuple[int, int, int, str | None]]:
        """path -> (id, bytes, mtime, label) for every item: what a rerun compares against."""
        rows = self.db.execute("SELECT path, id, bytes, mtime, label FROM items")
        return {py_path(p): (i, b, m, label) for p, i, b, m, label in rows}

    def paths(self) -> list[str]:
        return [py_path(r[0]) for r in self.db.execute("SELECT path FROM items ORDER BY id")]

    def labelled(self) -> int:
        return int(self.db.execute("SELECT count(label) FROM items").fetchone()[0])

    def ids_with_label(self, label: str) -> np.ndarray:
        rows = self.db.execute("SELECT id FROM items WHERE label = ? ORDER BY id", (label,))
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def set_labels(self, labels: Iterable[tuple[str | None, str]]) -> None:
        """Relabel items in one transaction: (label, path) pairs."""
        with self.writing():
            self.db.executemany(
                "UPDATE items SET label = ? WHERE path = ?",
                [(label, db_path(path)) for label, path in labels],
            )

    def rows_under(self, prefix: str) -> list[tuple[str, str | None, bytes]]:
        """(path, label, vector bytes) of the items whose path starts with `prefix`, by path.

        A plain prefix comparison of the bytes (LIKE would also match other letter cases).
        """
        key = prefix.encode("utf-8", "surrogateescape")
        rows = self.db.execute(
            "SELECT path, label, vector FROM items "
            "WHERE substr(CAST(path AS BLOB), 1, ?) = ? ORDER BY path",
            (len(key), key),
        ).fetchall()
        return [(py_path(p), label, v) for p, label, v in rows]

    def under(self, prefix: str) -> tuple[list[str], list[str | None], np.ndarray]:
        """Paths, labels and vectors of the items under a folder prefix, sorted by path."""
        rows = self.rows_under(prefix)
        dim = CatalogMeta.of(self).dim
        vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32)
        return [r[0] for r in rows], [r[1] for r in rows], vectors.reshape(len(rows), dim)

    def ids(self) -> np.ndarray:
        rows = self.db.execute("SELECT id FROM items ORDER BY id").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def items(self, ids: Iterable[int]) -> dict[int, Item]:
        """id -> Item for the ids that exist."""
        out: dict[int, Item] = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.db.execute(
                f"SELECT id, {ITEM_COLUMNS} FROM items WHERE id IN ({marks})", chunk
            ):
                out[row[0]] = Item(row[0], py_path(row[1]), *row[2:])
        return out

    def labels(self) -> list[str]:
        rows = self.db.execute("SELECT DISTINCT label FROM items WHERE label IS NOT NULL")
        return sorted(r[0] for r in rows)

    def vectors(self, ids: np.ndarray | None = None, batch: int = 65536) -> Iterator[tuple]:
        """Yield (ids, vectors) blocks in id order, for all items or the given ids."""
        dim = CatalogMeta.of(self).dim
        if ids is None:
            cursor = self.db.execute("SELECT id, vector FROM items ORDER BY id")
            while rows := cursor.fetchmany(batch):
                yield _block(rows, dim)
            return
        ids = np.sort(np.asarray(ids, dtype=np.int64))
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start : start + 500]]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT id, vector FROM items WHERE id IN ({marks}) ORDER BY id", chunk
            ).fetchall()
            if rows:
                yield _block(rows, dim)

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float32 vectors, found) for these ids in the order given."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.zeros((len(ids), CatalogMeta.of(self).dim), dtype=np.float32)
        found = np.zeros(len(ids), dtype=bool)
        wanted = np.unique(ids[ids >= 0])
        for block_ids, block in self.vectors(wanted):
            at = np.isin(ids, block_ids)
            out[at] = block[np.searchsorted(block_ids, ids[at])]
            found |= at
        return out, found

    def commit_batch(
        self, added: list[NewItem], failed: list[tuple[str, str]], replaced: Iterable[str] = ()
    ) -> list[int]:
        """In one transaction: drop `replaced` paths, insert `added`, record `failed`; new ids."""
        with self.writing():
            for path in replaced:
                self.db.execute("DELETE FROM items WHERE path = ?", (db_path(path),))
            ids = []
            for item in added:
                path = db_path(item.path)
                self.db.execute("DELETE FROM items WHERE path = ?", (path,))
                self.db.execute("DELETE FROM failures WHERE path = ?", (path,))
                vector = np.ascontiguousarray(item.vector, dtype=np.float32)
                cursor = self.db.execute(
                    "INSERT INTO items(path, label, sha256, bytes, mtime, width, height, vector) "
                    "VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        path,
                        item.label,
                        item.sha256,
                        item.bytes,
                        item.mtime,
                        item.width,
                        item.height,
                        vector.tobytes(),
                    ),
                )
                ids.append(int(cursor.lastrowid))
            # a file that changed into something undecodable loses its stale vector
            stale = [(db_path(p),) for p, _ in failed]
            self.db.executemany("DELETE FROM items WHERE path = ?", stale)
            self.db.executemany(
                "INSERT INTO failures(path, error) VALUES(?, ?) "
                "ON CONFLICT(path) DO UPDATE SET error = excluded.error",
                [(db_path(p), error) for p, error in failed],
            )
        return ids

    def remove_paths(self, paths: Iterable[str]) -> int:
        """Delete items and failures with these paths; how many items went."""
        keys = [(db_path(p),) for p in paths]
        with self.writing():
            before = len(self)
            self.db.executemany("DELETE FROM items WHERE path = ?", keys)
            self.db.executemany("DELETE FROM failures WHERE path = ?", keys)
            return before - len(self)

    def failures(self) -> list[tuple[str, str]]:
        rows = self.db.execute("SELECT path, error FROM failures ORDER BY path").fetchall()
        return [(py_path(p), error) for p, error in rows]


def _block(rows: list, dim: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(-1, dim)
    return ids, vectors


def open_store(index_path: str | Path) -> ShardedStore | Sidecar:
    """An index's items, read-only, in whichever format it is."""
    db = IndexFiles(index_path).catalog
    version = format_version(db)
    if version is None:
        damage = catalog_damage(index_path)
        if damage:
            raise DamagedIndex(damage)
        raise UserError(f"{index_path} is not an index (no readable {db.name})")
    if version > FORMAT_VERSION:
        raise UserError(f"{index_path} is a format {version} index; upgrade mocoserve")
    if version == FORMAT_VERSION:
        return ShardedStore(index_path)
    return Sidecar(db, readonly=True)


def migrate(index_path: str | Path) -> int:
    """Move a format-1 index (vectors in SQLite) to format 2 (one shard), keeping every id.

    The caller holds the index's writer lock. The shard is built in a temporary folder and
    renamed into place; the catalog switches to format 2 in one transaction that also drops
    the old tables, so a crash at any point leaves format 1 (redone next time) or format 2.
    Returns how many items moved.
    """
    files = IndexFiles(index_path)
    if format_version(files.sidecar) != 1:
        return 0
    old = Sidecar(files.sidecar)
    try:
        dim = CatalogMeta.of(old).dim
        if files.shards.exists():
            shutil.rmtree(files.shards)  # an earlier migration that did not finish
        moved = _copy_shard(old, files, dim) if dim else 0
        with old.writing():
            old.db.executemany(
                "INSERT INTO meta(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [
                    ("format_version", str(FORMAT_VERSION)),
                    ("shards", "1"),
                    ("store_dtype", "float32"),
                    ("shards_made", "0" if dim else ""),
                ],
            )
            old.db.execute("DROP TABLE items")
            old.db.execute("DROP TABLE failures")
        old.db.execute("VACUUM")
    finally:
        old.close()
    return moved


def _copy_shard(old: Sidecar, files: IndexFiles, dim: int) -> int:
    """Format 1's items, vectors and failures into shard 0 of 1, made in a staging folder
    and renamed into place; how many items moved."""
    staging = files.shards / ".migrating"
    moved = 0
    shard = Shard(staging, 0, 1, dim, writer=True)
    try:
        next_id = old.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
        for ids, vectors in old.vectors():
            items = old.items(ids)
            shard.import_items([items[int(i)] for i in ids], vectors)
            moved += len(ids)
        failures = old.failures()
        if failures:
            shard.commit_batch([], failures)
        if next_id:  # AUTOINCREMENT goes on from where format 1 was: no id reused
            _continue_ids(shard, int(next_id[0]))
    finally:
        shard.close()
    os.replace(staging, files.shard(0, 1))
    fsync_dir(files.shards)
    return moved


def _continue_ids(shard: Shard, last: int) -> None:
    """The shard's next seq comes after format 1's last id, removed ones included.

    sqlite_sequence has no unique key: a second 'items' row (INSERT OR REPLACE) is ignored,
    so the row the copied items made is updated, or made when no item was copied.
    """
    assert shard.db is not None
    with shard.db.writing():
        q = shard.db.db.execute
        raised = q(
            "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'items'", (last,)
        ).rowcount
        if not raised:
            q("INSERT INTO sqlite_sequence(name, seq) VALUES('items', ?)", (last,))
