"""A SQLite file of an index: its connection, transactions, and its `meta` table.

Shared by the format-1 sidecar, the format-2 catalog and each shard's `items.db`. Write
failures (a full disk) become one-line OSErrors naming the file; a file that is not ours
is a UserError.
"""

from __future__ import annotations

import errno
import sqlite3
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mocoserve.core.errors import UserError

META_SCHEMA = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"


class DbFile:
    """One SQLite file; `schema` is created when it is opened for writing."""

    what = "database"  # how error messages name it

    def __init__(
        self, path: str | Path, schema: str, readonly: bool = False, journal: str = "WAL"
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if readonly and not self.path.is_file():
            raise UserError(f"{self.path} is missing; an index needs its {self.what} (run embed)")
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        new = not self.path.exists()
        try:
            self.db = sqlite3.connect(uri, uri=True, timeout=60, check_same_thread=False)
            # closed also when this object is dropped unclosed (a reloaded index): the
            # connection's statement cache is a reference cycle, freed only by the collector
            weakref.finalize(self, self.db.close)
            if readonly:
                self.db.execute("PRAGMA query_only=1")
            else:
                if new:  # chosen once: changing it later needs every reader gone
                    self.db.execute(f"PRAGMA journal_mode={journal}")
                self.db.executescript(META_SCHEMA + schema)
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("SELECT count(*) FROM meta").fetchone()
        except sqlite3.OperationalError as e:  # cannot open or write: permissions, a full disk
            if "no such table" in str(e):
                raise UserError(f"{self.path} is not a mocoserve {self.what}") from None
            raise OSError(errno.EIO, f"cannot open the {self.what}: {e}", str(self.path)) from None
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path} is not a mocoserve {self.what} ({e})") from None

    @contextmanager
    def writing(self) -> Iterator[None]:
        """One transaction; SQLite's write failures (a full disk) become one-line OSErrors.

        What earlier transactions committed stays: the journal keeps the database whole.
        """
        try:
            with self.db:
                yield
        except sqlite3.OperationalError as e:
            code = errno.ENOSPC if "full" in str(e) else errno.EIO
            raise OSError(code, f"cannot write the {self.what}: {e}", str(self.path)) from None

    def close(self) -> None:
        self.db.close()

    def has_table(self, name: str) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return row is not None

    # meta
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, values: dict[str, str]) -> None:
        with self.writing():
            self.db.executemany(
                "INSERT INTO meta(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [(k, str(v)) for k, v in values.items()],
            )


def format_version(path: str | Path) -> int | None:
    """The format_version an index's `.db` file records (None: not there or not ours)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
            # format 1 recorded no version, but had its items: without them the file is a
            # damaged catalog (migrating it would discard the shards beside it)
            items = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'items'"
            ).fetchone()
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return None
    if row:
        return int(row[0])
    return 1 if items else None
