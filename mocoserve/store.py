"""The index's storage, format 2: metadata in SQLite per shard, vectors in append-only files.

    out.faiss                        the FAISS index, built from every shard (derived data)
    out.faiss.db                     the catalog: index-level facts (model, dim, shards, ...)
    out.faiss.shards/0003-of-0008/   one shard, written by one process at a time
        items.db                     SQLite: items (path, label, sha256, ..., row), failures,
                                     meta (rows committed, started/completed)
        vectors-0000.f32             its vectors, one row each, float32 (or .f16), append-only
        lock                         held (flock) by the shard's writer

An item's id is `seq * shards + shard` (seq: the shard's AUTOINCREMENT), so ids are unique
across shards and never reused. A file belongs to shard `blake2b(path) mod shards`, which a
rerun after adding files does not change. Each shard has one writer and its own SQLite file:
no SQLite file is written by two processes, so shards can be written at once, also from
hosts that share only a file system. The journal discipline: a batch's vectors are
appended and fsynced before the SQLite commit that references their rows; a writer that
opens a shard truncates a torn tail (rows no commit references).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mocoserve.core.errors import UserError
from mocoserve.core.files import fsync_dir
from mocoserve.dbfile import DbFile, format_version
from mocoserve.sidecar import Item, NewItem, Sidecar, db_path, py_path

FORMAT_VERSION = 2
DTYPES = {"float32": "f32", "float16": "f16"}

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
"""


def sidecar_path(index_path: str | Path) -> Path:
    """The catalog (format 2) or sidecar (format 1) beside an index file."""
    return Path(f"{index_path}.db")


def shards_path(index_path: str | Path) -> Path:
    return Path(f"{index_path}.shards")


def shard_path(index_path: str | Path, shard: int, shards: int) -> Path:
    return shards_path(index_path) / f"{shard:04d}-of-{shards:04d}"


def shard_of(path: str, shards: int) -> int:
    """The shard a file belongs to: a hash of its path, stable whatever else is indexed."""
    digest = hashlib.blake2b(os.fsencode(path), digest_size=8).digest()
    return int.from_bytes(digest, "little") % shards


def split_id(item_id: int, shards: int) -> tuple[int, int]:
    """id -> (shard, seq)."""
    return item_id % shards, item_id // shards


class Catalog(DbFile):
    """`out.faiss.db` of a format-2 index: index-level facts only (the `meta` table)."""

    what = "index catalog"

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        super().__init__(path, "", readonly, journal="DELETE")


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


class Shard:
    """One shard: `items.db` and its vector file; opened to read, or to write (with its lock)."""

    def __init__(
        self,
        folder: str | Path,
        shard: int,
        shards: int,
        dim: int,
        dtype: str = "float32",
        writer: bool = False,
    ) -> None:
        if dtype not in DTYPES:
            raise UserError(f"store dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.folder = Path(folder)
        self.shard, self.shards, self.dim = shard, shards, dim
        self.dtype = np.dtype(dtype)
        self.row_bytes = dim * self.dtype.itemsize
        self.writer = writer
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._row_of: np.ndarray | None = None  # seq -> row (-1: none), for gather
        self.db: ShardDb | None = None
        if writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock()
            self.db = ShardDb(self.folder / "items.db")
            stored = self.db.get_meta("dim")
            if stored is None:
                self.db.set_meta({"dim": str(dim), "dtype": dtype, "rows": "0", "garbage": "0"})
            elif (int(stored), self.db.get_meta("dtype")) != (dim, dtype):
                raise UserError(
                    f"{self.folder} holds {stored}-d {self.db.get_meta('dtype')} vectors, "
                    f"not {dim}-d {dtype}"
                )
            self._recover()
        elif (self.folder / "items.db").is_file():
            self.db = ShardDb(self.folder / "items.db", readonly=True)

    # files and recovery
    @property
    def vector_path(self) -> Path:
        return self.folder / f"vectors-0000.{DTYPES[self.dtype.name]}"

    def _lock(self) -> None:
        fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"shard {self.shard} of {self.folder.parent} is being written by another process"
            ) from None
        self._lock_fd = fd

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
            os.close(self._fd)
            self._fd = None
        if self.db is not None:
            self.db.close()
            self.db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the lock
            self._lock_fd = None

    # facts
    def _meta_int(self, key: str) -> int:
        return int(self.db.get_meta(key) or 0) if self.db is not None else 0

    @property
    def rows(self) -> int:
        return self._meta_int("rows")

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
        return int(self.db.db.execute("SELECT count(*) FROM items").fetchone()[0])

    def to_id(self, seq: np.ndarray | int):
        return seq * self.shards + self.shard

    # reading
    def _query(self, sql: str, params: Sequence = ()) -> list:
        return [] if self.db is None else self.db.db.execute(sql, params).fetchall()

    def _column(self, sql: str) -> np.ndarray:
        """One integer column, streamed from the cursor (no list of row tuples: 2M rows of
        Python tuples would be ~200 MB)."""
        if self.db is None:
            return np.zeros(0, dtype=np.int64)
        return np.fromiter((r[0] for r in self.db.db.execute(sql)), dtype=np.int64)

    def seqs(self) -> np.ndarray:
        return self._column("SELECT seq FROM items ORDER BY seq")

    def items(self, seqs: Iterable[int]) -> dict[int, Item]:
        """seq -> Item (with its global id) for the seqs that exist."""
        out: dict[int, Item] = {}
        seqs = [int(s) for s in seqs]
        for start in range(0, len(seqs), 500):  # SQLite's bound-parameter limit
            chunk = seqs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._query(
                "SELECT seq, path, label, sha256, bytes, mtime, width, height FROM items "
                f"WHERE seq IN ({marks})",
                chunk,
            ):
                out[row[0]] = Item(int(self.to_id(row[0])), py_path(row[1]), *row[2:])
        return out

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 vectors of these rows (in the order given), read with pread, not mapped.

        Reading (not memory-mapping) keeps a bulk pass over millions of rows out of the
        process's resident memory; runs of adjacent rows are read at once.
        """
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        if len(rows) == 0:
            return out
        if self._fd is None:
            self._fd = os.open(self.vector_path, os.O_RDONLY)
        rows = np.asarray(rows, dtype=np.int64)
        direct = self.dtype == np.float32 and bool(np.all(np.diff(rows) >= 0))
        order = np.arange(len(rows)) if direct else np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        start = 0
        for end in [*breaks.tolist(), len(sorted_rows)]:
            first, count = int(sorted_rows[start]), end - start
            offset, size = first * self.row_bytes, count * self.row_bytes
            if direct:  # rows in order (a bulk pass): straight into the result, no copy
                got = os.preadv(self._fd, [memoryview(out[start:end]).cast("B")], offset)
            else:
                data = os.pread(self._fd, size, offset)
                got = len(data)
                block = np.frombuffer(data, dtype=self.dtype).reshape(count, self.dim)
                out[order[start:end]] = block
            if got != size:
                raise OSError(errno.EIO, "vector file shorter than its rows", str(self.vector_path))
            start = end
        return out

    @property
    def block_rows(self) -> int:
        """Rows per block of a bulk pass: about 16 MB of float32, whatever the dimension."""
        return max(1024, (16 << 20) // (self.dim * 4))

    def vectors(self, seqs: np.ndarray | None = None, batch: int | None = None) -> Iterator[tuple]:
        """(ids, float32 vectors) blocks in seq order, for all items or the given seqs."""
        if self.db is None:
            return
        batch = batch or self.block_rows
        if seqs is None:
            cursor = self.db.db.execute("SELECT seq, row FROM items ORDER BY seq")
            while chunk := cursor.fetchmany(batch):
                pairs = np.asarray(chunk, dtype=np.int64).reshape(-1, 2)
                yield self.to_id(pairs[:, 0]), self.read_rows(pairs[:, 1])
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
            seq = self._column("SELECT seq FROM items ORDER BY seq")
            row = self._column("SELECT row FROM items ORDER BY seq")
            row_of = np.full(int(seq[-1]) + 1 if len(seq) else 0, -1, dtype=np.int64)
            row_of[seq] = row
            self._row_of = row_of.astype(np.int32) if len(row) and row.max() < 2**31 else row_of
            del seq, row, row_of
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
        return {
            r[0] for r in self._query("SELECT DISTINCT label FROM items WHERE label IS NOT NULL")
        }

    def ids_with_label(self, label: str) -> np.ndarray:
        rows = self._query("SELECT seq FROM items WHERE label = ?", (label,))
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

    # writing (the shard's one writer)
    def commit_batch(self, added: list[NewItem], failed: list[tuple[str, str]]) -> list[int]:
        """Append the vectors (fsynced), then record items and failures in one transaction."""
        assert self.writer and self.db is not None
        first = self.rows
        if added:
            block = np.ascontiguousarray(np.stack([a.vector for a in added]), dtype=self.dtype)
            try:
                with open(self.vector_path, "ab") as f:
                    if f.tell() != first * self.row_bytes:
                        raise OSError(errno.EIO, "does not end at its committed rows")
                    f.write(block.tobytes())
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:  # a full disk: nothing refers to the partial tail yet
                raise OSError(
                    e.errno, f"cannot write the vectors: {e.strerror}", str(self.vector_path)
                ) from None
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


class ShardedStore:
    """A format-2 index's items across its shards, read-only (search, knn, app, service)."""

    def __init__(self, index_path: str | Path) -> None:
        self.index_path = Path(index_path)
        self.catalog = Catalog(sidecar_path(index_path), readonly=True)
        self.shards = int(self.catalog.get_meta("shards") or 1)
        self.dim = int(self.catalog.get_meta("dim") or 0)
        self.dtype = self.catalog.get_meta("store_dtype") or "float32"
        self._open: dict[int, Shard] = {}
        self._len: int | None = None

    def shard(self, s: int) -> Shard:
        if s not in self._open:
            folder = shard_path(self.index_path, s, self.shards)
            self._open[s] = Shard(folder, s, self.shards, self.dim, self.dtype)
        return self._open[s]

    def all_shards(self) -> Iterator[Shard]:
        for s in range(self.shards):
            yield self.shard(s)

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


def open_store(index_path: str | Path) -> ShardedStore | Sidecar:
    """An index's items, read-only, in whichever format it is."""
    db = sidecar_path(index_path)
    version = format_version(db)
    if version is None:
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
    index_path = Path(index_path)
    db = sidecar_path(index_path)
    if format_version(db) != 1:
        return 0
    old = Sidecar(db)
    try:
        dim = int(old.get_meta("dim") or 0)
        shards_dir = shards_path(index_path)
        if shards_dir.exists():
            shutil.rmtree(shards_dir)  # an earlier migration that did not finish
        staging = shards_dir / ".migrating"
        moved = 0
        if dim:
            shard = Shard(staging, 0, 1, dim, writer=True)
            try:
                next_id = old.db.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'items'"
                ).fetchone()
                for ids, vectors in old.vectors():
                    items = old.items(ids)
                    _copy_rows(shard, [items[int(i)] for i in ids], vectors)
                    moved += len(ids)
                failures = old.failures()
                if failures:
                    shard.commit_batch([], failures)
                if next_id:  # AUTOINCREMENT goes on from where format 1 was: no id reused
                    with shard.db.writing():  # type: ignore[union-attr]
                        shard.db.db.execute(  # type: ignore[union-attr]
                            "INSERT OR REPLACE INTO sqlite_sequence(name, seq) VALUES('items', ?)",
                            (int(next_id[0]),),
                        )
            finally:
                shard.close()
            os.replace(staging, shard_path(index_path, 0, 1))
            fsync_dir(shards_dir)
        with old.writing():
            old.db.executemany(
                "INSERT INTO meta(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [
                    ("format_version", str(FORMAT_VERSION)),
                    ("shards", "1"),
                    ("store_dtype", "float32"),
                ],
            )
            old.db.execute("DROP TABLE items")
            old.db.execute("DROP TABLE failures")
        old.db.execute("VACUUM")
    finally:
        old.close()
    return moved


def _copy_rows(shard: Shard, items: list[Item], vectors: np.ndarray) -> None:
    """Copy format-1 items with their ids (seq = id: one shard) and vectors into a shard."""
    assert shard.db is not None
    first = shard.rows
    with open(shard.vector_path, "ab") as f:
        f.write(np.ascontiguousarray(vectors, dtype=shard.dtype).tobytes())
        f.flush()
        os.fsync(f.fileno())
    with shard.db.writing():
        shard.db.db.executemany(
            "INSERT INTO items(seq, path, label, sha256, bytes, mtime, width, height, row) "
            "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (it.id, db_path(it.path), it.label, it.sha256, it.bytes, it.mtime, it.width,
                 it.height, first + k)
                for k, it in enumerate(items)
            ],
        )  # fmt: skip
        shard._set_rows(first + len(items))
