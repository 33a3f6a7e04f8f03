"""The index's storage, format 2: metadata in SQLite per shard, vectors in append-only files.

    out.faiss                        the FAISS index, built from every shard (derived data)
    out.faiss.db                     the catalog: index-level facts (model, dim, shards, ...)
    out.faiss.shards/0003-of-0008/   one shard, written by one process at a time
        items.db                     SQLite: items (path, label, sha256, ..., row), failures,
                                     meta (rows committed, started/completed)
        vectors-0000.f32             its vectors, one row each, float32 (or .f16), append-only
        lock                         held (flock) by the shard's writer

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

import errno
import fcntl
import hashlib
import os
import shutil
import sqlite3
import weakref
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mocoserve.core.errors import UserError
from mocoserve.core.files import fsync_dir
from mocoserve.index.dbfile import DbFile, format_version
from mocoserve.index.formats import Item, NewItem, Sidecar, db_path, py_path

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
CREATE TABLE IF NOT EXISTS blocks (
    block INTEGER PRIMARY KEY,  -- rows from crc_from + block * crc_block_rows (shard meta)
    rows INTEGER NOT NULL,      -- how many of its rows the checksum covers (all but the last)
    crc32 INTEGER NOT NULL      -- zlib.crc32 of those rows' bytes
);
"""

# |norm^2 - 1| a stored row may show: float32 rows are normalised to ~1e-7, float16 rounds
# each value by up to 2^-11; random bytes miss this by orders of magnitude
NORM_TOLERANCE = {"float32": 1e-3, "float16": 1e-2}


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


def index_of(shard_folder: Path) -> str:
    """The index a shard folder belongs to (`out.faiss` of `out.faiss.shards/0000-of-0004`)."""
    return str(shard_folder.parent).removesuffix(".shards")


def shard_missing(folder: Path, shard: int) -> str | None:
    """Why a shard the catalog lists is not there (its folder or items.db), or None."""
    gone = folder if not folder.is_dir() else folder / "items.db"
    if gone.is_file():
        return None
    return f"{gone} is missing: shard {shard} of {index_of(folder)} is listed in its catalog"


class DamagedIndex(UserError):
    """A file of the index is damaged or gone (told apart from bad input: a service
    answers it as its own fault, not the client's)."""


def refusal(problem: str, index: str | Path) -> DamagedIndex:
    """A reader's one line for damage it met: the file, and where to see the rest."""
    return DamagedIndex(f"{problem} (mocoserve index check {index} lists every problem)")


def has_index_data(index_path: str | Path) -> bool:
    """Whether an index's FAISS file or any shard is there (what a new catalog would orphan)."""
    shards = shards_path(index_path)
    return Path(index_path).exists() or (shards.is_dir() and any(shards.iterdir()))


def catalog_damage(index_path: str | Path) -> str | None:
    """Why the catalog beside an index cannot be used, when it is there; None if it can."""
    db = sidecar_path(index_path)
    if not db.is_file():
        return None
    if db.stat().st_size == 0:
        return f"{db} is damaged: it is empty (0 bytes)"
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            meta = dict(conn.execute("SELECT key, value FROM meta")) if "meta" in tables else {}
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        return f"{db} is damaged: not a readable SQLite file ({e})"
    if "meta" not in tables:
        return f"{db} is damaged: it has no meta table"
    if "format_version" not in meta and "items" not in tables:  # neither format 2 nor 1
        return f"{db} is damaged: its meta table has no format_version"
    if meta.get("format_version") == str(FORMAT_VERSION):
        lost = [key for key in ("dim", "shards") if not meta.get(key)]
        if lost:
            return f"{db} is damaged: its meta table has no {' or '.join(lost)}"
    return None


class Catalog(DbFile):
    """`out.faiss.db` of a format-2 index: index-level facts only (the `meta` table)."""

    what = "index catalog"

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        super().__init__(path, "", readonly, journal="DELETE")

    def listed_shards(self) -> set[int] | None:
        """The shards writers have made (None: an index from before the catalog listed them)."""
        value = self.get_meta("shards_made")
        return None if value is None else {int(s) for s in value.split(",") if s}

    def list_shards(self, shards: Iterable[int]) -> None:
        """Add shards that now exist to the list (the catalog's writer, under the index lock)."""
        listed = self.listed_shards()
        new = (listed or set()) | set(shards)
        if listed is None or new != listed:
            self.set_meta({"shards_made": ",".join(map(str, sorted(new)))})


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


@dataclass
class ShardCheck:
    """What `Shard.check` found: damage (each a line naming its file), notes, rows checked."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    by_checksum: int = 0  # rows verified against their block's CRC32
    by_norm: int = 0  # rows without a checksum (written before they were kept): norms only


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
        required: bool = False,
        strict: bool = True,
    ) -> None:
        """`required`: the catalog lists this shard, so its folder and items.db must be there.
        `strict` (a reader): refuse a vector file that cannot hold the committed rows (False:
        `index check`, which lists the problems instead)."""
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
        self._last_seq: int | None = None  # held (`hold`): the newest seq this reader sees
        self.db: ShardDb | None = None
        self._crc_from: int | None = None  # the first row with checksums (None: none kept)
        self._crc_rows = self.block_rows
        self._reserved = 0  # the writer's: rows the vector file may reach before a commit
        missing = shard_missing(self.folder, shard) if required else None
        if missing:  # never made anew, never read as empty: the rest of the index needs it
            raise refusal(missing, index_of(self.folder))
        if writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock()
            self.db = ShardDb(self.folder / "items.db")
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
        elif (self.folder / "items.db").is_file():
            self.db = ShardDb(self.folder / "items.db", readonly=True)
            self._load_checksums()
            problem = self.file_problem() if strict else None
            if problem:
                self.close()
                raise self._refuse(problem)

    def _load_checksums(self) -> None:
        assert self.db is not None
        start, rows = self.db.get_meta("crc_from"), self.db.get_meta("crc_block_rows")
        self._crc_from = None if start is None else int(start)
        self._crc_rows = int(rows) if rows else self.block_rows

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
                self._trim_checksums(whole)
        with open(path, "ab") as f:
            f.truncate(whole * self.row_bytes)
            f.flush()
            os.fsync(f.fileno())

    def _set_rows(self, rows: int) -> None:
        assert self.db is not None
        self.db.db.execute("UPDATE meta SET value = ? WHERE key = 'rows'", (str(rows),))

    def _put_meta(self, key: str, value: int) -> None:
        """One meta value, inside the caller's transaction."""
        assert self.db is not None
        self.db.db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, str(value)),
        )

    def _trim_checksums(self, rows: int) -> None:
        """Checksums for the first `rows` rows only (a lost write shortened the file)."""
        assert self.db is not None
        if self._crc_from is None:
            return
        q = self.db.db.execute
        if rows <= self._crc_from:
            q("DELETE FROM blocks")
            self._put_meta("crc_from", rows)
            self._crc_from = rows
            return
        block, keep = divmod(rows - self._crc_from, self._crc_rows)
        q("DELETE FROM blocks WHERE block >= ?", (block + (1 if keep else 0),))
        if keep:  # the block the file now ends in: its checksum anew, from what is left
            data = self._pread(self._crc_from + block * self._crc_rows, keep)
            q("INSERT OR REPLACE INTO blocks VALUES(?, ?, ?)", (block, keep, zlib.crc32(data)))

    def _checksum(self, first: int, data: bytes) -> None:
        """Extend the blocks' CRC32s over rows appended at `first` (in the commit's
        transaction): one row per block of ~16 MB, crc32 costs ~10 ms a block."""
        assert self.db is not None
        if self._crc_from is None or first < self._crc_from:
            return
        q, view, size = self.db.db.execute, memoryview(data), self.row_bytes
        row, pos = first, 0
        while pos < len(view):
            block, offset = divmod(row - self._crc_from, self._crc_rows)
            take = min(self._crc_rows - offset, (len(view) - pos) // size)
            got = q("SELECT rows, crc32 FROM blocks WHERE block = ?", (block,)).fetchone()
            covered, crc = got if got else (0, 0)
            if covered != offset:  # rows written without checksums (an older writer): from
                start = row - offset  # the file, as it is
                covered, crc = offset, zlib.crc32(self._pread(start, offset))
            crc = zlib.crc32(view[pos : pos + take * size], crc)
            q("INSERT OR REPLACE INTO blocks VALUES(?, ?, ?)", (block, offset + take, crc))
            row, pos = row + take, pos + take * size

    def _reserve(self, end: int) -> None:
        """Let the vector file grow to `end` rows before it is appended to: a reader tells a
        torn tail (up to `reserved`) from bytes that do not belong (beyond it). Each commit
        reserves its next batch's room, so this costs a transaction only when batches grow."""
        if end > self._reserved:
            assert self.db is not None
            with self.db.writing():
                self._put_meta("reserved", end)
            self._reserved = end

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

    # a reader that serves a loaded index
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
            raise self._refuse(f"{self.folder / 'items.db'} is damaged: {e}") from None
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

    def _open_vectors(self) -> None:
        """The vector file, opened once. Held, no file is opened by name any more: one that
        was not there when the reader held its rows is another version's."""
        if self._fd is not None:
            return
        if self._last_seq is not None:
            gone = "not there when the index was loaded"
            raise OSError(errno.ENOENT, gone, str(self.vector_path))
        fd = os.open(self.vector_path, os.O_RDONLY)
        # closed by `close`, or when the shard is dropped unclosed (a reloaded index)
        self._fd, self._close_fd = fd, weakref.finalize(self, os.close, fd)

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
        q = f"SELECT count(*) FROM items WHERE {self._seen}"
        return int(self.db.db.execute(q).fetchone()[0])

    def to_id(self, seq: np.ndarray | int):
        return seq * self.shards + self.shard

    # damage
    def _damaged(self, what: str) -> str:
        return f"{self.vector_path} is damaged: {what}"

    def _refuse(self, problem: str) -> DamagedIndex:
        return refusal(problem, index_of(self.folder))

    def file_problem(self) -> str | None:
        """Why the vector file cannot be this shard's, by its size alone (None: it can)."""
        if self.db is None:
            return None
        rows = self.rows  # read before the size: the bytes of committed rows come first
        try:
            size = self.vector_path.stat().st_size
        except FileNotFoundError:
            size = None
        reserved = self.db.get_meta("reserved")  # after: the writer reserves, then appends
        need = rows * self.row_bytes
        if size is None:
            if not rows:
                return None
            return f"{self.vector_path} is missing: its shard commits {rows:,} rows to it"
        if size < need:
            return self._damaged(f"{size:,} bytes, its {rows:,} committed rows take {need:,}")
        if reserved is not None and size > max(int(reserved), rows) * self.row_bytes:
            return self._damaged(f"{size - need:,} bytes past its {rows:,} committed rows")
        return None

    def _bad_norms(self, vectors: np.ndarray) -> np.ndarray:
        """Rows that are not unit vectors (all-zero rows pass: what a model may return)."""
        with np.errstate(over="ignore", invalid="ignore"):
            n2 = np.einsum("ij,ij->i", vectors, vectors)
            return ~(np.abs(n2 - 1) <= NORM_TOLERANCE[self.dtype.name]) & (n2 != 0)

    def _check_norms(self, vectors: np.ndarray, rows: np.ndarray) -> None:
        bad = self._bad_norms(vectors)
        if bad.any():
            i = int(np.argmax(bad))
            with np.errstate(over="ignore", invalid="ignore"):
                norm = float(np.sqrt(np.sum(np.square(vectors[i], dtype=np.float64))))
            raise self._refuse(
                self._damaged(f"row {int(rows[i])} is not a unit vector (norm {norm:.3g})")
            )

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
        return self._column(f"SELECT seq FROM items WHERE {self._seen} ORDER BY seq")

    def items(self, seqs: Iterable[int]) -> dict[int, Item]:
        """seq -> Item (with its global id) for the seqs that exist."""
        out: dict[int, Item] = {}
        seqs = [int(s) for s in seqs]
        for start in range(0, len(seqs), 500):  # SQLite's bound-parameter limit
            chunk = seqs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._query(
                "SELECT seq, path, label, sha256, bytes, mtime, width, height FROM items "
                f"WHERE seq IN ({marks}) AND {self._seen}",
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
        self._open_vectors()
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
        self._check_norms(out, rows)  # a row read alone has no checksum to hand: its norm
        return out

    def _pread(self, first: int, count: int) -> bytes:
        """`count` rows' bytes from row `first`, exactly (short: the file is damaged)."""
        self._open_vectors()
        data = os.pread(self._fd, count * self.row_bytes, first * self.row_bytes)
        if len(data) != count * self.row_bytes:
            raise self._refuse(self._damaged(f"shorter than its rows {first}-{first + count - 1}"))
        return data

    def _checksums(self) -> dict[int, tuple[int, int]]:
        """block -> (rows it covers, crc32)."""
        if self.db is None or not self.db.has_table("blocks"):
            return {}
        rows = self.db.db.execute("SELECT block, rows, crc32 FROM blocks").fetchall()
        return {b: (n, crc) for b, n, crc in rows}

    def _block(self, block: int, rows: int, crc: int) -> tuple[np.ndarray, str | None]:
        """A block's rows as stored, and the problem if its checksum does not match."""
        first = (self._crc_from or 0) + block * self._crc_rows
        data = self._pread(first, rows)
        problem = None
        if zlib.crc32(data) != crc:
            problem = self._damaged(f"rows {first}-{first + rows - 1} do not match their checksum")
        return np.frombuffer(data, dtype=self.dtype).reshape(rows, self.dim), problem

    def _read_checked(self, rows: np.ndarray, blocks: dict, held: dict) -> np.ndarray:
        """float32 rows of a bulk pass: whole blocks read and checked against their CRC32
        (`held`: the last one read, since a pass goes through the rows in order); rows that
        no checksum covers (written before they were kept) are read by `read_rows`."""
        if self._crc_from is None or not blocks:
            return self.read_rows(rows)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        rel = rows - self._crc_from
        block_of = np.where(rel >= 0, rel // self._crc_rows, -1)
        covered = np.zeros(len(rows), dtype=bool)
        for block in np.unique(block_of[block_of >= 0]).tolist():
            if block not in blocks:
                continue
            count, crc = blocks[block]
            mine = (block_of == block) & (rel - block * self._crc_rows < count)
            if not mine.any():
                continue
            if held.get("block") != block:
                vectors, problem = self._block(block, count, crc)
                if problem:
                    raise self._refuse(problem)
                held["block"], held["rows"] = block, vectors
            out[mine] = held["rows"][rel[mine] - block * self._crc_rows]
            covered |= mine
        if not covered.all():
            out[~covered] = self.read_rows(rows[~covered])
        return out

    def check(self) -> ShardCheck:
        """Every problem of this shard's files (`index check`): the vector file's size,
        items past the committed rows, every block's checksum, norms where none is kept."""
        found = ShardCheck()
        if self.db is None:
            return found
        path, size_of_row = self.vector_path, self.row_bytes
        problem = self.file_problem()
        if problem:
            found.problems.append(problem)
        rows = self.rows
        size = path.stat().st_size if path.exists() else 0
        if not problem and size > rows * size_of_row:
            found.notes.append(
                f"{path}: {size - rows * size_of_row:,} bytes past its committed rows (a write "
                "that was interrupted or is running; the next embed truncates them)"
            )
        beyond = self._query("SELECT count(*) FROM items WHERE row < 0 OR row >= ?", (rows,))
        if beyond[0][0]:
            found.problems.append(
                f"{self.folder / 'items.db'} is damaged: {beyond[0][0]:,} items name rows "
                f"past its {rows:,} committed rows"
            )
        readable = min(rows, size // size_of_row)
        spans = []  # (first, end) of the rows checksums cover
        for block, (count, crc) in sorted(self._checksums().items()):
            first = (self._crc_from or 0) + block * self._crc_rows
            end = min(first + count, readable)
            if end <= first:
                continue
            spans.append((first, end))
            if end < first + count:
                continue  # the file is short: said above
            problem = self._block(block, count, crc)[1]
            found.by_checksum += count
            if problem:
                found.problems.append(problem)
        start = 0
        for first, end in [*spans, (readable, readable)]:  # the rows between: norms only
            for at in range(start, first, self.block_rows):
                count = min(self.block_rows, first - at)
                block = np.frombuffer(self._pread(at, count), dtype=self.dtype)
                bad = self._bad_norms(block.reshape(count, self.dim).astype(np.float32))
                found.by_norm += count
                if bad.any():
                    found.problems.append(
                        f"{path} is damaged: {int(bad.sum()):,} of rows {at}-{at + count - 1} "
                        f"are not unit vectors (the first: row {at + int(np.argmax(bad))})"
                    )
            start = max(start, end)
        if found.by_norm:
            found.notes.append(
                f"{path}: {found.by_norm:,} rows have no checksums (written before mocoserve "
                "kept them): checked by their norms only"
            )
        return found

    @property
    def block_rows(self) -> int:
        """Rows per block of a bulk pass: about 16 MB of float32, whatever the dimension."""
        return max(1024, (16 << 20) // (self.dim * 4))

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

    # writing (the shard's one writer)
    def commit_batch(self, added: list[NewItem], failed: list[tuple[str, str]]) -> list[int]:
        """Append the vectors (fsynced), then record items and failures in one transaction."""
        assert self.writer and self.db is not None
        first, data = self.rows, b""
        if added:
            block = np.ascontiguousarray(np.stack([a.vector for a in added]), dtype=self.dtype)
            data = block.tobytes()
            self._reserve(first + len(added))
            try:
                with open(self.vector_path, "ab") as f:
                    if f.tell() != first * self.row_bytes:
                        raise OSError(errno.EIO, "does not end at its committed rows")
                    f.write(data)
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
        self.listed = self.catalog.listed_shards()  # None: an index from before the list
        for s in sorted(self.listed or ()):  # a lost shard is refused, not read as empty
            missing = shard_missing(shard_path(self.index_path, s, self.shards), s)
            if missing:
                self.catalog.close()
                raise refusal(missing, self.index_path)

    def shard(self, s: int) -> Shard:
        if s not in self._open:
            folder = shard_path(self.index_path, s, self.shards)
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


def open_store(index_path: str | Path) -> ShardedStore | Sidecar:
    """An index's items, read-only, in whichever format it is."""
    db = sidecar_path(index_path)
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
                    ("shards_made", "0" if dim else ""),
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
    data = np.ascontiguousarray(vectors, dtype=shard.dtype).tobytes()
    shard._reserve(first + len(items))
    with open(shard.vector_path, "ab") as f:
        f.write(data)
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
        shard._checksum(first, data)
        shard._put_meta("reserved", first + len(items))
