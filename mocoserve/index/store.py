"""The index's storage, format 2: metadata in SQLite per shard, vectors in append-only files.

    out.faiss                        the FAISS index, built from every shard (derived data)
    out.faiss.db                     the catalog: index-level facts (`mocoserve.index.catalog`)
    out.faiss.shards/0003-of-0008/   one shard, written by one process at a time
        items.db                     SQLite: items (path, label, sha256, ..., row), failures,
                                     meta (rows committed, started/completed)
        vectors-0000.f32             its vectors, one row each, float32 (or .f16), append-only
                                     (`mocoserve.index.vectorfile`)
        lock                         held (flock) by the shard's writer

(`mocoserve.index.files.IndexFiles` names every one of these files.)

Damage is refused by name, never read past: the catalog lists the shards writers made
(`shards_made`), and a listed shard whose folder or items.db is gone is an error; a vector
file must hold its committed rows and end by the shard's `reserved` rows (the writer raises
it before it appends, so a torn tail is told from appended bytes); each block of rows has a
CRC32 in `blocks`, checked by every pass that reads whole blocks (build, export, check), and
every row read one by one must be a unit vector.

An item's id is `seq * shards + shard` (seq: the shard's AUTOINCREMENT), so ids are unique
across shards and never reused. A file belongs to shard `blake2b(path) mod shards`, which a
rerun after adding files does not change. Each shard has one writer and its own SQLite file:
no SQLite file is written by two processes, so shards can be written at once, also from
hosts that share only a file system. The journal discipline: a batch's vectors are
appended and fsynced before the SQLite commit that references their rows; a writer that
opens a shard truncates a torn tail (rows no commit references).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mocoserve.core.errors import UserError
from mocoserve.core.files import lock_file
from mocoserve.core.tars import key_group
from mocoserve.index.catalog import Catalog, CatalogMeta
from mocoserve.index.dbfile import DbFile
from mocoserve.index.files import IndexFiles, ShardFiles, refusal
from mocoserve.index.items import ITEM_COLUMNS, Item, NewItem, db_path, py_path
from mocoserve.index.vectorfile import VectorFile

SHARD_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused; the id is seq * shards + shard
    path TEXT NOT NULL UNIQUE,              -- text, or the name's exact bytes (not UTF-8)
    label TEXT,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    mtime INTEGER NOT NULL,                 -- st_mtime_ns
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    row INTEGER NOT NULL                    -- the vector's row in the shard's vector file
);
CREATE INDEX IF NOT EXISTS items_label ON items(label);
CREATE TABLE IF NOT EXISTS failures (path TEXT PRIMARY KEY, error TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (
    block INTEGER PRIMARY KEY,  -- rows from crc_from + block * crc_block_rows (shard meta)
    rows INTEGER NOT NULL,      -- how many of its rows the checksum covers (all but the last)
    crc32 INTEGER NOT NULL      -- zlib.crc32 of those rows' bytes
);
"""


def shard_of(path: str, shards: int) -> int:
    """The shard a file belongs to: a hash of its path, stable whatever else is indexed.
    A tar member's is its tar's (`core.tars.key_group`): a tar's items stay together."""
    digest = hashlib.blake2b(os.fsencode(key_group(path)), digest_size=8).digest()
    return int.from_bytes(digest, "little") % shards


def split_id(item_id: int, shards: int) -> tuple[int, int]:
    """id -> (shard, seq)."""
    return item_id % shards, item_id // shards


def shard_missing(folder: Path, shard: int) -> str | None:
    """Why a shard the catalog lists is not there (its folder or items.db), or None."""
    files = ShardFiles(folder)
    gone = folder if not folder.is_dir() else files.db
    if gone.is_file():
        return None
    return f"{gone} is missing: shard {shard} of {files.index} is listed in its catalog"


class ShardDb(DbFile):
    what = "shard database"

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        # a rollback journal, not WAL: WAL needs shared memory, which a network file system
        # (a cluster's shared disk) does not give; each shard has one writer anyway
        super().__init__(path, SHARD_SCHEMA, readonly, journal="DELETE")


@dataclass
class ShardCounts:
    """What one shard holds."""

    items: int
    failures: int
    rows: int
    garbage: int  # rows of removed or replaced items, still in the vector file


class Shard(VectorFile):
    """One shard: `items.db` and its vector file; opened to read, or to write (with its lock)."""

    def __init__(
        self,
        folder: str | Path,
        shard: int,
        shards: int,
        dim: int,
        dtype: str = "float32",
        writer: bool = False,
        required: bool = False,
        strict: bool = True,
    ) -> None:
        """`required`: the catalog lists this shard, so its folder and items.db must be there.
        `strict` (a reader): refuse a vector file that cannot hold the committed rows (False:
        `index check`, which lists the problems instead)."""
        super().__init__(folder, dim, dtype)
        self.shard, self.shards = shard, shards
        self.writer = writer
        self._lock_fd: int | None = None
        self._row_of: np.ndarray | None = None  # seq -> row (-1: none), for gather
        missing = shard_missing(self.folder, shard) if required else None
        if missing:  # never made anew, never read as empty: the rest of the index needs it
            raise refusal(missing, self.files.index)
        if writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock()
            self.db = ShardDb(self.files.db)
            stored = self.db.get_meta("dim")
            if stored is None:
                self.db.set_meta(
                    {"dim": str(dim), "dtype": dtype, "rows": "0", "garbage": "0",
                     "reserved": "0", "crc_from": "0", "crc_block_rows": str(self.block_rows)}
                )  # fmt: skip
            elif (int(stored), self.db.get_meta("dtype")) != (dim, dtype):
                raise UserError(
                    f"{self.folder} holds {stored}-d {self.db.get_meta('dtype')} vectors, "
                    f"not {dim}-d {dtype}"
                )
            self._load_checksums()
            self._recover()
            if self._crc_from is None:  # a shard from before checksums: kept from here on
                rows = str(self.rows)
                self.db.set_meta(
                    {"crc_from": rows, "crc_block_rows": str(self.block_rows), "reserved": rows}
                )
                self._load_checksums()
            self._reserved = max(self._meta_int("reserved"), self.rows)
        elif self.files.db.is_file():
            self.db = ShardDb(self.files.db, readonly=True)
            self._load_checksums()
            problem = self.file_problem() if strict else None
            if problem:
                self.close()
                raise self._refuse(problem)

    def _lock(self) -> None:
        busy = f"shard {self.shard} of {self.folder.parent} is being written by another process"
        self._lock_fd = lock_file(self.files.lock, busy)

    def _recover(self) -> None:
        """Make the vector file agree with the committed rows (a writer opening the shard).

        Longer: a run died between writing vectors and committing them; the tail goes.
        Shorter (a lost write): the items whose rows are gone are forgotten, and the next
        run embeds those files again.
        """
        assert self.db is not None
        rows = self.rows
        path = self.vector_path
        size = path.stat().st_size if path.exists() else 0
        if size == rows * self.row_bytes:
            return
        whole = min(size // self.row_bytes, rows)
        if whole < rows:
            with self.db.writing():
                self.db.db.execute("DELETE FROM items WHERE row >= ?", (whole,))
                self._set_rows(whole)
                self._trim_checksums(whole)
        with open(path, "ab") as f:
            f.truncate(whole * self.row_bytes)
            f.flush()
            os.fsync(f.fileno())

    def _set_rows(self, rows: int) -> None:
        assert self.db is not None
        self.db.db.execute("UPDATE meta SET value = ? WHERE key = 'rows'", (str(rows),))

    def close(self) -> None:
        self._row_of = None
        if self._fd is not None:
            self._close_fd()
            self._fd = None
        if self.db is not None:
            self.db.close()
            self.db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the lock
            self._lock_fd = None

    def hold(self) -> None:
        """Hold what this reader reads from now on: the vector file open, the seq -> row
        table read. The files at these names may be replaced by another index (a re-embed)
        and grown by a writer; this reader keeps reading the ones it opened, and only the
        rows committed by now (seqs are never reused: later rows have larger seqs)."""
        if self.db is None or self.writer:
            return
        try:
            self._row_of = self._row_table()
        except sqlite3.DatabaseError as e:
            raise self._refuse(f"{self.files.db} is damaged: {e}") from None
        seqs = np.flatnonzero(self._row_of >= 0)
        if len(seqs):
            try:
                self._open_vectors()
            except FileNotFoundError:
                raise self._refuse(f"{self.vector_path} is missing") from None
        self._last_seq = int(seqs[-1]) if len(seqs) else 0

    @property
    def _seen(self) -> str:
        """SQL: the items rows this reader sees (held: none committed after it was held)."""
        return "1" if self._last_seq is None else f"seq <= {int(self._last_seq)}"

    def _row_table(self) -> np.ndarray:
        """seq -> row (-1: no item), int32 where rows allow: 4 bytes an item."""
        pairs = np.zeros((0, 2), dtype=np.int64)
        if self.db is not None:
            cursor = self.db.db.execute(f"SELECT seq, row FROM items WHERE {self._seen}")
            pairs = np.fromiter(cursor, dtype=np.dtype((np.int64, 2)))
        seq, row = pairs[:, 0], pairs[:, 1]
        row_of = np.full(int(seq.max()) + 1 if len(seq) else 0, -1, dtype=np.int64)
        row_of[seq] = row
        return row_of.astype(np.int32) if len(row) and row.max() < 2**31 else row_of

    def counts(self) -> ShardCounts:
        if self.db is None:
            return ShardCounts(0, 0, 0, 0)
        q = self.db.db.execute
        items = int(q("SELECT count(*) FROM items").fetchone()[0])
        failures = int(q("SELECT count(*) FROM failures").fetchone()[0])
        return ShardCounts(items, failures, self.rows, self._meta_int("garbage"))

    def __len__(self) -> int:
        if self.db is None:
            return 0
        q = f"SELECT count(*) FROM items WHERE {self._seen}"
        return int(self.db.db.execute(q).fetchone()[0])

    def to_id(self, seq: np.ndarray | int):
        return seq * self.shards + self.shard

    def _column(self, sql: str) -> np.ndarray:
        """One integer column, streamed from the cursor (no list of row tuples: 2M rows of
        Python tuples would be ~200 MB)."""
        if self.db is None:
            return np.zeros(0, dtype=np.int64)
        return np.fromiter((r[0] for r in self.db.db.execute(sql)), dtype=np.int64)

    def seqs(self) -> np.ndarray:
        return self._column(f"SELECT seq FROM items WHERE {self._seen} ORDER BY seq")

    def items(self, seqs: Iterable[int]) -> dict[int, Item]:
        """seq -> Item (with its global id) for the seqs that exist."""
        out: dict[int, Item] = {}
        seqs = [int(s) for s in seqs]
        for start in range(0, len(seqs), 500):  # SQLite's bound-parameter limit
            chunk = seqs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._query(
                f"SELECT seq, {ITEM_COLUMNS} FROM items WHERE seq IN ({marks}) AND {self._seen}",
                chunk,
            ):
                out[row[0]] = Item(int(self.to_id(row[0])), py_path(row[1]), *row[2:])
        return out

    def vectors(self, seqs: np.ndarray | None = None, batch: int | None = None) -> Iterator[tuple]:
        """(ids, float32 vectors) blocks in seq order, for all items or the given seqs."""
        if self.db is None:
            return
        batch = batch or self.block_rows
        if seqs is None:  # a bulk pass (build, export): every block it reads is checked
            blocks, held = self._checksums(), {}
            cursor = self.db.db.execute("SELECT seq, row FROM items ORDER BY seq")
            while chunk := cursor.fetchmany(batch):
                pairs = np.asarray(chunk, dtype=np.int64).reshape(-1, 2)
                yield self.to_id(pairs[:, 0]), self._read_checked(pairs[:, 1], blocks, held)
            return
        seqs = np.sort(np.asarray(seqs, dtype=np.int64))
        for start in range(0, len(seqs), 500):
            chunk = [int(s) for s in seqs[start : start + 500]]
            marks = ",".join("?" * len(chunk))
            found = self._query(
                f"SELECT seq, row FROM items WHERE seq IN ({marks}) ORDER BY seq", chunk
            )
            if found:
                pairs = np.asarray(found, dtype=np.int64).reshape(-1, 2)
                yield self.to_id(pairs[:, 0]), self.read_rows(pairs[:, 1])

    def gather(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float32 vectors, found) for these seqs in the order given.

        Random access for re-ranking search candidates: the seq -> row table (4 bytes an
        item) is read once; rows are read with pread (`read_rows`), not memory-mapped: a
        mapping's fault-around would count up to 64 KB of neighbours per candidate in this
        process's RSS. A reader is a snapshot: seqs committed after the first call are not
        found.
        """
        if self._row_of is None:
            self._row_of = self._row_table()
        seqs = np.asarray(seqs, dtype=np.int64)
        known = (seqs >= 0) & (seqs < len(self._row_of))
        rows = np.full(len(seqs), -1, dtype=np.int64)
        rows[known] = self._row_of[seqs[known]]
        found = rows >= 0
        out = np.zeros((len(seqs), self.dim), dtype=np.float32)
        if found.any():
            out[found] = self.read_rows(rows[found])
        return out, found

    def labels(self) -> set[str]:
        q = f"SELECT DISTINCT label FROM items WHERE label IS NOT NULL AND {self._seen}"
        return {r[0] for r in self._query(q)}

    def ids_with_label(self, label: str) -> np.ndarray:
        rows = self._query(f"SELECT seq FROM items WHERE label = ? AND {self._seen}", (label,))
        return self.to_id(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))

    def labelled(self) -> int:
        return int(self._query("SELECT count(label) FROM items")[0][0]) if self.db else 0

    def paths(self) -> list[tuple[int, str]]:
        return [
            (int(self.to_id(s)), py_path(p)) for s, p in self._query("SELECT seq, path FROM items")
        ]

    def failures(self) -> list[tuple[str, str]]:
        return [(py_path(p), e) for p, e in self._query("SELECT path, error FROM failures")]

    def stats(self) -> dict[str, tuple[int, int, int, str | None]]:
        """path -> (id, bytes, mtime, label) for every item: what a rerun compares against."""
        rows = self._query("SELECT path, seq, bytes, mtime, label FROM items")
        return {py_path(p): (int(self.to_id(s)), b, m, lab) for p, s, b, m, lab in rows}

    def under(self, prefix: str) -> list[tuple[str, str | None, int]]:
        """(path, label, row) of the items whose path starts with `prefix` (bytes compared)."""
        key = prefix.encode("utf-8", "surrogateescape")
        rows = self._query(
            "SELECT path, label, row FROM items WHERE substr(CAST(path AS BLOB), 1, ?) = ?",
            (len(key), key),
        )
        return [(py_path(p), label, row) for p, label, row in rows]

    def commit_batch(self, added: list[NewItem], failed: list[tuple[str, str]]) -> list[int]:
        """Append the vectors (fsynced), then record items and failures in one transaction."""
        assert self.writer and self.db is not None
        first, data = self.rows, b""
        if added:
            block = np.ascontiguousarray(np.stack([a.vector for a in added]), dtype=self.dtype)
            data = block.tobytes()
            self._reserve(first + len(added))
            self._append(first, data)
        ids = []
        with self.db.writing():
            q = self.db.db.execute
            replaced = 0
            for offset, item in enumerate(added):
                path = db_path(item.path)
                replaced += q("DELETE FROM items WHERE path = ?", (path,)).rowcount
                q("DELETE FROM failures WHERE path = ?", (path,))
                cursor = q(
                    "INSERT INTO items(path, label, sha256, bytes, mtime, width, height, row) "
                    "VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                    (path, item.label, item.sha256, item.bytes, item.mtime, item.width,
                     item.height, first + offset),
                )  # fmt: skip
                ids.append(int(self.to_id(int(cursor.lastrowid))))
            for path, error in failed:  # a file that changed into something undecodable
                replaced += q("DELETE FROM items WHERE path = ?", (db_path(path),)).rowcount
                q(
                    "INSERT INTO failures(path, error) VALUES(?, ?) "
                    "ON CONFLICT(path) DO UPDATE SET error = excluded.error",
                    (db_path(path), error),
                )
            self._set_rows(first + len(added))
            self._add_garbage(replaced)
            if added:
                self._checksum(first, data)
                # room for the next batch of this size, so it needs no transaction of its own
                self._put_meta("reserved", first + 2 * len(added))
        if added:
            self._reserved = first + 2 * len(added)
        return ids

    def _add_garbage(self, n: int) -> None:
        if n:
            assert self.db is not None
            self.db.db.execute(
                "UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = 'garbage'", (n,)
            )

    def remove_paths(self, paths: Iterable[str]) -> int:
        """Forget these files (items and failures); how many items went."""
        assert self.writer and self.db is not None
        keys = [(db_path(p),) for p in paths]
        with self.db.writing():
            before = len(self)
            self.db.db.executemany("DELETE FROM items WHERE path = ?", keys)
            self.db.db.executemany("DELETE FROM failures WHERE path = ?", keys)
            removed = before - len(self)
            self._add_garbage(removed)
        return removed

    def set_labels(self, labels: Iterable[tuple[str | None, str]]) -> None:
        assert self.writer and self.db is not None
        with self.db.writing():
            self.db.db.executemany(
                "UPDATE items SET label = ? WHERE path = ?",
                [(label, db_path(path)) for label, path in labels],
            )

    def import_items(self, items: list[Item], vectors: np.ndarray) -> None:
        """Add items with their ids as seqs, and their vectors (a format-1 index migrating
        into one shard, where seq = id)."""
        assert self.writer and self.db is not None and self.shards == 1
        first = self.rows
        data = np.ascontiguousarray(vectors, dtype=self.dtype).tobytes()
        self._reserve(first + len(items))
        self._append(first, data)
        with self.db.writing():
            self.db.db.executemany(
                f"INSERT INTO items(seq, {ITEM_COLUMNS}, row) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (it.id, db_path(it.path), it.label, it.sha256, it.bytes, it.mtime, it.width,
                     it.height, first + k)
                    for k, it in enumerate(items)
                ],
            )  # fmt: skip
            self._set_rows(first + len(items))
            self._checksum(first, data)
            self._put_meta("reserved", first + len(items))


class ShardedStore:
    """A format-2 index's items across its shards, read-only (search, knn, app, service)."""

    def __init__(self, index_path: str | Path) -> None:
        self.index_path = Path(index_path)
        self.files = IndexFiles(self.index_path)
        self.catalog = Catalog(self.files.catalog, readonly=True)
        meta = CatalogMeta.of(self.catalog)
        self.shards, self.dim, self.dtype = meta.shards, meta.dim, meta.store_dtype
        self._open: dict[int, Shard] = {}
        self._len: int | None = None
        self.listed = self.catalog.listed_shards()  # None: an index from before the list
        for s in sorted(self.listed or ()):  # a lost shard is refused, not read as empty
            missing = shard_missing(self.files.shard(s, self.shards), s)
            if missing:
                self.catalog.close()
                raise refusal(missing, self.index_path)

    def shard(self, s: int) -> Shard:
        if s not in self._open:
            folder = self.files.shard(s, self.shards)
            required = self.listed is not None and s in self.listed
            self._open[s] = Shard(folder, s, self.shards, self.dim, self.dtype, required=required)
        return self._open[s]

    def verify(self) -> None:
        """Read every shard's vectors against their checksums (norms where none is kept):
        the first damage found is a UserError naming its file."""
        for shard in self.all_shards():
            problems = shard.check().problems
            if problems:
                raise refusal(problems[0], self.index_path)

    def all_shards(self) -> Iterator[Shard]:
        for s in range(self.shards):
            yield self.shard(s)

    def hold(self) -> None:
        """Open every shard and hold its files and rows (`Shard.hold`): a reader that serves
        an index reads nothing later by name, so nothing of a later version."""
        for shard in self.all_shards():
            shard.hold()
        self._len = None  # counted again, over the rows held

    def close(self) -> None:
        for shard in self._open.values():
            shard.close()
        self._open.clear()
        self.catalog.close()

    # the reader API (the format-1 Sidecar has the same)
    def get_meta(self, key: str) -> str | None:
        return self.catalog.get_meta(key)

    def meta(self) -> dict[str, str]:
        return self.catalog.meta()

    def __len__(self) -> int:
        if self._len is None:  # a reader is a snapshot: counted once
            self._len = sum(len(s) for s in self.all_shards())
        return self._len

    def ids(self) -> np.ndarray:
        parts = [s.to_id(s.seqs()) for s in self.all_shards()]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def _by_shard(self, ids: Iterable[int]) -> dict[int, list[int]]:
        grouped: dict[int, list[int]] = {}
        for i in ids:
            s, seq = split_id(int(i), self.shards)
            grouped.setdefault(s, []).append(seq)
        return grouped

    def items(self, ids: Iterable[int]) -> dict[int, Item]:
        out: dict[int, Item] = {}
        for s, seqs in self._by_shard(ids).items():
            if s < self.shards:
                out.update({item.id: item for item in self.shard(s).items(seqs).values()})
        return out

    def vectors(self, ids: np.ndarray | None = None, batch: int | None = None) -> Iterator[tuple]:
        """(ids, float32 vectors) blocks of about 16 MB: shard by shard, each in id order."""
        if ids is None:
            for shard in self.all_shards():
                yield from shard.vectors(None, batch)
            return
        for s, seqs in sorted(self._by_shard(ids).items()):
            if s < self.shards:
                yield from self.shard(s).vectors(np.asarray(seqs, dtype=np.int64))

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float32 vectors, found) for these ids in the order given (see Shard.gather)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        found = np.zeros(len(ids), dtype=bool)
        shard_no, seqs = ids % self.shards, ids // self.shards
        for s in np.unique(shard_no[ids >= 0]).tolist():
            mine = (shard_no == s) & (ids >= 0)
            out[mine], found[mine] = self.shard(s).gather(seqs[mine])
        return out, found

    def labels(self) -> list[str]:
        found: set[str] = set()
        for shard in self.all_shards():
            found |= shard.labels()
        return sorted(found)

    def ids_with_label(self, label: str) -> np.ndarray:
        parts = [s.ids_with_label(label) for s in self.all_shards()]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def labelled(self) -> int:
        return sum(s.labelled() for s in self.all_shards())

    def paths(self) -> list[str]:
        pairs = sorted(p for s in self.all_shards() for p in s.paths())
        return [path for _, path in pairs]

    def failures(self) -> list[tuple[str, str]]:
        return sorted(f for s in self.all_shards() for f in s.failures())

    def under(self, prefix: str) -> tuple[list[str], list[str | None], np.ndarray]:
        """Paths, labels and vectors of the items under a folder prefix, sorted by path."""
        found = []
        for shard in self.all_shards():
            rows = shard.under(prefix)
            if rows:
                vectors = shard.read_rows(np.asarray([r[2] for r in rows], dtype=np.int64))
                found.extend((p, label, v) for (p, label, _), v in zip(rows, vectors, strict=True))
        found.sort(key=lambda r: os.fsencode(r[0]))
        vectors = np.stack([r[2] for r in found]) if found else np.zeros((0, self.dim), np.float32)
        return [r[0] for r in found], [r[1] for r in found], vectors
