"""The SQLite sidecar of an index (`out.faiss.db`): one row per embedded image, its vector too.

The sidecar is the journal: every embedded batch is committed here first, with its
vectors, so a killed run loses at most one batch. The FAISS file is derived from it and
rebuilt or patched to agree with it (see `mocoserve.vectors.sync`).
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mocoserve.core.errors import UserError

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
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


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


_ITEM_COLUMNS = "id, path, label, sha256, bytes, mtime, width, height"


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


class Sidecar:
    """The `items`, `failures` and `meta` tables of one index."""

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One transaction; SQLite's write failures (a full disk) become one-line OSErrors.

        What earlier transactions committed stays: the journal keeps the database whole.
        """
        try:
            with self.db:
                yield
        except sqlite3.OperationalError as e:
            code = errno.ENOSPC if "full" in str(e) else errno.EIO
            raise OSError(code, f"cannot write the sidecar: {e}", str(self.path)) from None

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly and not self.path.is_file():
            raise UserError(f"{self.path} is missing; an index needs its sidecar (run embed)")
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        try:
            self.db = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL" if not readonly else "PRAGMA query_only=1")
            self.db.execute("PRAGMA synchronous=FULL")
            if not readonly:
                self.db.executescript(_SCHEMA)
            self.db.execute("SELECT count(*) FROM items").fetchone()
        except sqlite3.OperationalError as e:  # cannot open or write: permissions, a full disk
            if "no such table" in str(e):
                raise UserError(f"{self.path} is not a mocoserve sidecar database") from None
            raise OSError(errno.EIO, f"cannot open the sidecar: {e}", str(self.path)) from None
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path} is not a mocoserve sidecar database ({e})") from None
        version = self.get_meta("format_version")
        if version is None and not readonly:
            self.set_meta({"format_version": str(SIDECAR_FORMAT_VERSION)})
        elif version is not None and int(version) > SIDECAR_FORMAT_VERSION:
            raise UserError(f"{self.path} is a version {version} sidecar; upgrade mocoserve")

    def close(self) -> None:
        self.db.close()

    # meta
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, values: dict[str, str]) -> None:
        with self._writing():
            self.db.executemany(
                "INSERT INTO meta(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [(k, str(v)) for k, v in values.items()],
            )

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
        with self._writing():
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
                f"SELECT {_ITEM_COLUMNS} FROM items WHERE id IN ({marks})", chunk
            ):
                out[row[0]] = Item(row[0], py_path(row[1]), *row[2:])
        return out

    def labels(self) -> list[str]:
        rows = self.db.execute("SELECT DISTINCT label FROM items WHERE label IS NOT NULL")
        return sorted(r[0] for r in rows)

    def vectors(self, ids: np.ndarray | None = None, batch: int = 65536) -> Iterator[tuple]:
        """Yield (ids, vectors) blocks in id order, for all items or the given ids."""
        dim = int(self.get_meta("dim") or 0)
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

    def commit_batch(
        self, added: list[NewItem], failed: list[tuple[str, str]], replaced: Iterable[str] = ()
    ) -> list[int]:
        """In one transaction: drop `replaced` paths, insert `added`, record `failed`; new ids."""
        with self._writing():
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
        with self._writing():
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
