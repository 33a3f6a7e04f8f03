"""The vector file of a shard: rows appended, read with pread, checked block by block.

    vectors-0000.f32    one row per vector, float32 (or .f16), append-only; the shard's
                        items.db commits `rows` of them and keeps a CRC32 per block of rows
                        (`blocks`, from row `crc_from`, `crc_block_rows` rows a block)

`VectorFile` is the half of a `mocoserve.index.store.Shard` that is this file: its size
against the committed rows, its checksums, reading rows (bulk passes checked against their
blocks' CRC32, rows read one by one by their norm) and `check`. The shard adds its items
database, its lock and its writer.
"""

from __future__ import annotations

import errno
import os
import weakref
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mocoserve.core.errors import UserError
from mocoserve.index.dbfile import DbFile
from mocoserve.index.files import DamagedIndex, ShardFiles, refusal

DTYPES = {"float32": "f32", "float16": "f16"}  # a store dtype -> its vector file's extension

# |norm^2 - 1| a stored row may show: float32 rows are normalised to ~1e-7, float16 rounds
# each value by up to 2^-11; random bytes miss this by orders of magnitude
NORM_TOLERANCE = {"float32": 1e-3, "float16": 1e-2}


@dataclass
class ShardCheck:
    """What `Shard.check` found: damage (each a line naming its file), notes, rows checked."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    by_checksum: int = 0  # rows verified against their block's CRC32
    by_norm: int = 0  # rows without a checksum (written before they were kept): norms only


class VectorFile:
    """A shard's vector file and its block checksums (kept in the shard's database, `db`)."""

    def __init__(self, folder: str | Path, dim: int, dtype: str) -> None:
        if dtype not in DTYPES:
            raise UserError(f"store dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.folder = Path(folder)
        self.files = ShardFiles(self.folder)
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self.row_bytes = dim * self.dtype.itemsize
        self.db: DbFile | None = None  # the shard's items.db (opened by the shard)
        self._fd: int | None = None
        self._last_seq: int | None = None  # held (`Shard.hold`): the newest seq a reader sees
        self._crc_from: int | None = None  # the first row with checksums (None: none kept)
        self._crc_rows = self.block_rows
        self._reserved = 0  # the writer's: rows the vector file may reach before a commit

    def _load_checksums(self) -> None:
        assert self.db is not None
        start, rows = self.db.get_meta("crc_from"), self.db.get_meta("crc_block_rows")
        self._crc_from = None if start is None else int(start)
        self._crc_rows = int(rows) if rows else self.block_rows

    @property
    def vector_path(self) -> Path:
        return self.files.vectors(DTYPES[self.dtype.name])

    # checksums and appending (the writer)
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

    def _append(self, first: int, data: bytes) -> None:
        """Append rows at `first` (the committed rows) and fsync them, before the commit
        that references them: a full disk leaves a tail nothing refers to yet."""
        try:
            with open(self.vector_path, "ab") as f:
                if f.tell() != first * self.row_bytes:
                    raise OSError(errno.EIO, "does not end at its committed rows")
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OSError(
                e.errno, f"cannot write the vectors: {e.strerror}", str(self.vector_path)
            ) from None

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

    # damage
    def _damaged(self, what: str) -> str:
        return f"{self.vector_path} is damaged: {what}"

    def _refuse(self, problem: str) -> DamagedIndex:
        return refusal(problem, self.files.index)

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
                f"{self.files.db} is damaged: {beyond[0][0]:,} items name rows "
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
