"""`check_index`: every problem of an index's files, found without changing any of them.

What `mocoserve index check` prints. The readers refuse the first damage they meet (one
line naming the file); this goes through the whole index and lists it all: the catalog,
the shards it lists (and folders that are no shard of it), each shard's database
(SQLite's quick_check, its meta), each vector file's size, every block's CRC32 (norms for
rows written before checksums were kept) and the FAISS file. Files are opened read-only
and no lock is taken, so nothing is written, not even a lock file.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from mocoserve.core.errors import UserError
from mocoserve.index.catalog import FORMAT_VERSION, Catalog, CatalogMeta, catalog_damage
from mocoserve.index.dbfile import format_version
from mocoserve.index.files import DamagedIndex, IndexFiles, ShardFiles
from mocoserve.index.formats import Sidecar
from mocoserve.index.store import Shard, ShardDb, shard_missing
from mocoserve.index.vectorfile import DTYPES

SHARD_NAME = re.compile(r"^(\d{4})-of-(\d{4})$")


@dataclass
class CheckReport:
    """What `check_index` found: problems (each one line naming its file) and notes."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shards: int = 0  # shards read
    items: int = 0
    by_checksum: int = 0  # vector rows verified by their block's CRC32
    by_norm: int = 0  # rows with no checksum, checked by their norm

    @property
    def clean(self) -> bool:
        return not self.problems


def check_index(index_path: str | Path) -> CheckReport:
    """Every problem of the index at `index_path` (see the module docstring)."""
    index_path = Path(index_path)
    files = IndexFiles(index_path)
    db = files.catalog
    report = CheckReport()
    if not db.is_file():
        if not files.has_data():
            raise UserError(f"{index_path} is not an index (no {db.name}); make one with embed")
        report.problems.append(f"{db} is missing: the index's files are there without it")
    damage = catalog_damage(index_path)
    if damage:
        report.problems.append(damage)
    version = format_version(db) if not damage else None
    if version == 1:
        sidecar = Sidecar(files.sidecar, readonly=True)
        try:
            report.items = len(sidecar)
        finally:
            sidecar.close()
        report.notes.append(
            f"{index_path} is format 1 (vectors inside {db.name}): its files are not checked; "
            "mocoserve index migrate moves it to the layout this check reads"
        )
        return report
    if version is not None and version > FORMAT_VERSION:
        raise UserError(f"{index_path} is a format {version} index; upgrade mocoserve")
    meta: CatalogMeta | None = None
    listed: set[int] | None = None
    if version == FORMAT_VERSION:
        catalog = Catalog(db, readonly=True)
        try:
            meta, listed = CatalogMeta.of(catalog), catalog.listed_shards()
        except DamagedIndex as e:  # a value that does not parse: the catalog is the problem
            report.problems.append(str(e))
            return report
        finally:
            catalog.close()
    n = (meta.shards if meta is not None else 0) or _shards_from_folders(index_path)
    if not n:
        return report
    _check_folders(index_path, n, report)
    if version == FORMAT_VERSION and listed is None:
        report.notes.append(
            f"{db.name} does not list its shards (an index from before it did): a missing "
            "shard cannot be told from one not written yet; the next embed or index build "
            "lists them"
        )
    unwritten = []
    for s in range(n):
        folder = files.shard(s, n)
        missing = shard_missing(folder, s)
        if missing:
            if (listed is not None and s in listed) or (listed is None and folder.is_dir()):
                report.problems.append(missing)
            else:
                unwritten.append(s)
            continue
        _check_shard(folder, s, n, meta, report)
    if unwritten:
        shown = ", ".join(map(str, unwritten[:10])) + (" ..." if len(unwritten) > 10 else "")
        report.notes.append(f"shard(s) {shown} not written yet (no run has embedded into them)")
    if meta is not None:  # format 2
        _check_faiss(index_path, meta, report)
    return report


def _shards_from_folders(index_path: Path) -> int:
    """The shard count the folder names say (the catalog cannot): the most common N."""
    folder = IndexFiles(index_path).shards
    counts: dict[int, int] = {}
    for entry in folder.iterdir() if folder.is_dir() else ():
        match = SHARD_NAME.match(entry.name)
        if match:
            counts[int(match[2])] = counts.get(int(match[2]), 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else 0


def _check_folders(index_path: Path, n: int, report: CheckReport) -> None:
    """What is in the shards folder that is no shard of an n-shard index."""
    folder = IndexFiles(index_path).shards
    for entry in sorted(folder.iterdir()) if folder.is_dir() else ():
        match = SHARD_NAME.match(entry.name)
        if not (match and int(match[2]) == n and int(match[1]) < n):
            report.problems.append(
                f"{entry} is not a shard of this {n}-shard index (readers ignore it: another "
                "index's data, or one made over a damaged catalog)"
            )


def _check_shard(
    folder: Path, s: int, n: int, meta: CatalogMeta | None, report: CheckReport
) -> None:
    items_db = ShardFiles(folder).db
    try:
        db = ShardDb(items_db, readonly=True)
    except (UserError, OSError) as e:
        report.problems.append(f"{items_db} is damaged: {e}")
        return
    try:
        verdict = [r[0] for r in db.db.execute("PRAGMA quick_check").fetchall()]
        shard_meta = db.meta()
    except sqlite3.DatabaseError as e:
        report.problems.append(f"{items_db} is damaged: {e}")
        return
    finally:
        db.close()
    if verdict != ["ok"]:
        report.problems.append(f"{items_db} is damaged: SQLite says {'; '.join(verdict[:3])}")
        return
    dim, dtype = shard_meta.get("dim"), shard_meta.get("dtype") or "float32"
    if not dim or not dim.isdigit() or dtype not in DTYPES or "rows" not in shard_meta:
        report.problems.append(f"{items_db} is damaged: its meta has no dim, dtype or rows")
        return
    if meta is not None and (int(dim), dtype) != (meta.dim, meta.store_dtype):
        report.problems.append(
            f"{items_db} holds {dim}-d {dtype} vectors; the catalog says {meta.dim}-d "
            f"{meta.store_dtype}"
        )
        return
    shard = Shard(folder, s, n, int(dim), dtype, strict=False)
    try:
        found = shard.check()
        report.items += len(shard)
    finally:
        shard.close()
    report.shards += 1
    report.problems += found.problems
    report.notes += found.notes
    report.by_checksum += found.by_checksum
    report.by_norm += found.by_norm


def _check_faiss(index_path: Path, meta: CatalogMeta, report: CheckReport) -> None:
    """The FAISS file is derived (readers patch or rebuild it in memory): told apart."""
    from mocoserve.ann.io import read

    dim, built = meta.dim, meta.version
    if not dim or not built:
        report.notes.append(f"{index_path} has not been built yet (mocoserve index build)")
        return
    index = read(index_path, dim) if index_path.is_file() else None
    if index is None:
        why = "is missing" if not index_path.exists() else "is damaged: FAISS cannot read it"
        report.problems.append(f"{index_path} {why} (mocoserve index build makes it again)")
    elif index.ntotal != report.items:
        report.notes.append(
            f"{index_path} holds {index.ntotal:,} vectors, the store {report.items:,}: "
            "readers patch it in memory until the next build"
        )
