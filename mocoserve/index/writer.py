"""The write path of an index, in one place: `IndexWriter`.

Whoever changes an index goes through an `IndexWriter`: it takes the index's writer lock
(`out.faiss.lock`) to create, migrate or build; it opens, each under its own lock, the
shards this process writes; it routes committed batches to their shards; and it builds the
FAISS file from every shard. Readers (search, knn, the app, the service) never write.

A build is a decision (`plan_build`: `Rebuild | Patch | Retune | Keep`, from plain facts)
and the steps that carry it out. The ingest pipeline that feeds the writer (read, decode,
model, commit) is `mocoserve.ingest`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

from mocoserve.ann.factory import base_ivf, exact_codes, new_index, on_disk
from mocoserve.ann.io import lists_file, write_atomic
from mocoserve.ann.ondisk import patch_on_disk
from mocoserve.ann.params import apply_settings
from mocoserve.ann.planner import FLAT_LIMIT, IndexChoice, Plan, show_size
from mocoserve.ann.sync import diff_ids
from mocoserve.ann.tune import RECALL_TARGET, tune
from mocoserve.core.errors import UserError
from mocoserve.core.files import lock_file
from mocoserve.core.manifest import ModelFacts
from mocoserve.index.catalog import (
    BUILT,
    CHOICE,
    FORMAT_VERSION,
    MADE,
    Catalog,
    CatalogMeta,
    catalog_damage,
)
from mocoserve.index.dbfile import format_version
from mocoserve.index.faissfile import build_faiss, load_faiss, same_kind
from mocoserve.index.files import DamagedIndex, IndexFiles, refusal
from mocoserve.index.formats import migrate
from mocoserve.index.items import NewItem
from mocoserve.index.store import Shard, ShardedStore, shard_missing, shard_of
from mocoserve.index.vectorfile import DTYPES


class FileStat(Protocol):
    """A scanned file: what a rerun compares with what a shard holds."""

    path: str
    label: str | None
    bytes: int
    mtime: int


def acquire_lock(index_path: str | Path, wait: bool = False) -> int:
    """The index's writer lock (a file descriptor; closing it releases the lock)."""
    busy = f"{index_path} is being written by another process"
    return lock_file(IndexFiles(index_path).lock, busy, wait)


@dataclass
class BuildInfo:
    """What a build made."""

    items: int
    factory: str
    nprobe: int | None
    recall_at_10: float | None
    version: int
    summary: str = ""  # `CatalogMeta.describe_build`'s line


# --- what a build does: decided from plain facts, then carried out ---


@dataclass(frozen=True)
class FaissFacts:
    """The FAISS file as a build finds it."""

    present: bool  # there, readable, and of the kind the catalog names
    on_disk: bool = False  # its inverted lists are in a lists file
    ivf: bool = False
    stale: int = 0  # on-disk lists: ids the store no longer has
    missing: int = 0  # ... and ids the store has that the lists lack


@dataclass(frozen=True)
class Rebuild:
    """Train and tune a new index (its lists in a new lists file when `on_disk`)."""

    factory: str
    on_disk: bool
    why: str  # the plan's reason, remembered as plan_why
    note: str | None = None  # said to the user: the index type changed, and why


@dataclass(frozen=True)
class Patch:
    """Patch on-disk lists by id into a new lists file (readers keep the old one until they
    reopen); `retune` the search settings too (the recall target changed)."""

    retune: bool = False


@dataclass(frozen=True)
class Retune:
    """Keep the index; tune its search settings for a new recall target."""


@dataclass(frozen=True)
class Keep:
    """Keep the index and its settings (an in-memory index is patched by id as it is read)."""


Decision = Rebuild | Patch | Retune | Keep
DRIFT = 0.1  # an IVF index is trained anew when the count drifts this much from its training


def plan_build(
    meta: CatalogMeta, n: int, plan: Plan, target: float, disk: bool, found: FaissFacts
) -> Decision:
    """What a build of `n` vectors does, given the catalog, the planner's choice for them,
    the recall target, whether the lists go on disk, and the FAISS file as found.

    Rebuilt when the file is missing, of another kind (an IVF's nlist within 2x is the same
    kind), moved to or from disk, or an IVF whose count drifted 10% from its training;
    otherwise on-disk lists that lag the store are patched, and search is re-tuned when the
    recall target changed.
    """
    current = meta.factory
    kind_changed = not same_kind(current, plan.factory)
    drifted = abs(n - meta.tuned_ntotal) > DRIFT * max(meta.tuned_ntotal, 1)
    if not found.present or kind_changed or found.on_disk != disk or (found.ivf and drifted):
        note = None
        if found.present and kind_changed:
            note = f"index type {current} -> {plan.factory} ({plan.why})"
        return Rebuild(plan.factory if kind_changed else current, disk, plan.why, note)
    retune = meta.tuned_target != target
    if found.on_disk and (found.stale or found.missing):
        return Patch(retune)
    return Retune() if retune else Keep()


class IndexWriter:
    """The one writer of an index (see the module docstring); a context manager.

    `lock=True` holds the index's writer lock for the writer's life: creating, migrating and
    building need it. A process that writes only its own shards (a --shard task, a torchrun
    rank other than 0) opens a writer with `lock=False`.
    """

    def __init__(
        self,
        index_path: str | Path,
        lock: bool = True,
        wait: bool = False,
        flat_limit: int = FLAT_LIMIT,
    ) -> None:
        self.path = Path(index_path)
        self.files = IndexFiles(self.path)
        self.flat_limit = flat_limit
        if not self.path.parent.is_dir():
            raise UserError(f"folder {self.path.parent} does not exist (for --index {self.path})")
        self._lock_fd = acquire_lock(self.path, wait) if lock else None
        self.shards: dict[int, Shard] = {}
        self.notes: list[str] = []
        self._catalog: Catalog | None = None

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()
        self.shards.clear()
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # the catalog
    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def catalog(self) -> Catalog:
        """The catalog, writable with the lock, else read-only (a shard-only writer)."""
        if self._catalog is None:
            db = self.files.catalog
            if not self.locked and format_version(db) != FORMAT_VERSION:
                raise UserError(f"{self.path} is not ready yet (its builder has not made it)")
            self._catalog = Catalog(db, readonly=not self.locked)
        return self._catalog

    def meta(self) -> CatalogMeta:
        return CatalogMeta.of(self.catalog())

    @property
    def shard_count(self) -> int:
        return self.meta().shards

    def prepare(
        self,
        model: ModelFacts,
        shards: int | None = None,
        store_dtype: str | None = None,
        choice: IndexChoice | None = None,
        labels_from_folders: bool | None = None,
        expected: int = 0,
    ) -> CatalogMeta:
        """Create the index, or migrate (format 1) and check it: the model, dim, shards.

        `model` is the facts of the package that makes the vectors (`ModelFacts.of_package`).
        `shards` and `store_dtype` are fixed when the index is made; given again they must
        match. `choice` (--index-type, --max-index-memory, --recall-target, --on-disk) and
        `labels_from_folders` are remembered for later runs.
        """
        if not self.locked:
            raise RuntimeError("prepare needs the index's writer lock")
        self._refuse_to_orphan()
        if format_version(self.files.catalog) == 1:
            moved = migrate(self.path)
            self.notes.append(f"moved {moved} items to the sharded layout (no re-embedding)")
        catalog = self.catalog()
        if shards is not None and not 1 <= shards <= 4096:
            raise UserError(f"--shards must be from 1 to 4096, got {shards}")
        if store_dtype is not None and store_dtype not in DTYPES:
            raise UserError(f"--store-dtype must be {' or '.join(DTYPES)}, got {store_dtype!r}")
        meta = self.meta()
        if meta.model_sha256 is None:
            catalog.set_meta(meta.made_with(model, shards, store_dtype).to_meta(MADE))
        else:
            meta.check_model(self.path, model.sha256, model.dim)
            if shards is not None and shards != meta.shards:
                raise UserError(
                    f"{self.path} was made with {meta.shards} shard(s), not {shards}: the shard "
                    f"count is fixed when an index is made (use --shard I/{meta.shards})"
                )
            if store_dtype is not None and store_dtype != meta.store_dtype:
                raise UserError(f"{self.path} stores {meta.store_dtype} vectors, not {store_dtype}")
        self.list_shards()
        if choice is not None:
            self.choose(choice, expected)
        if labels_from_folders is not None:
            labels = "folders" if labels_from_folders else "none"
            catalog.set_meta(self.meta().replace(labels=labels).to_meta(["labels"]))
        return self.meta()

    def _refuse_to_orphan(self) -> None:
        """Never a new index over another file, nor over a damaged catalog's data."""
        db = self.files.catalog
        if self.path.exists() and not db.is_file():
            raise UserError(
                f"{self.path} exists and is not an index made by embed (no {db.name}); "
                "choose another --index"
            )
        damage = catalog_damage(self.path)
        if damage and self.files.has_data():  # never a new index over the old one's shards
            raise DamagedIndex(
                f"{damage}; the index's data is beside it ({self.files.shards.name}): "
                "restore the catalog, or embed into a new --index"
            )

    def list_shards(self) -> None:
        """Refuse a shard the catalog lists that is gone; list the ones made since (a
        torchrun rank's, or any from before the catalog kept the list)."""
        catalog, n = self.catalog(), self.shard_count
        listed = catalog.listed_shards()
        for s in sorted(listed or ()):
            missing = shard_missing(self.files.shard(s, n), s)
            if missing:
                raise refusal(missing, self.path)
        present = {s for s in range(n) if self.files.shard_db(s, n).is_file()}
        if self.locked and (listed is None or not present <= listed):
            catalog.list_shards(present)

    def choose(self, choice: IndexChoice, expected: int = 0) -> None:
        """Remember what the index is to be built as; checked (a UserError) before any work."""
        meta = self.meta()
        remembered = meta.replace(choice=meta.choice.merged(choice))
        if meta.dim:
            n = max(expected, meta.index_ntotal, 1)
            new_index(remembered.choice.plan(n, meta.dim, self.flat_limit).factory, meta.dim)
        given = choice.to_meta()  # only what was given is written
        self.catalog().set_meta(remembered.to_meta(k for k in CHOICE if k in given))

    def labelled_by_folders(self) -> bool:
        return self.meta().labelled_by_folders

    # the shards this process writes
    def own(self, shard_ids: Iterable[int]) -> None:
        """Open these shards for writing (each under its own lock)."""
        meta = self.meta()
        n = meta.shards
        listed = self.catalog().listed_shards()
        for s in shard_ids:
            if s not in self.shards:
                required = listed is not None and s in listed  # a lost one is not made anew
                folder = self.files.shard(s, n)
                self.shards[s] = Shard(
                    folder, s, n, meta.dim, meta.store_dtype, writer=True, required=required
                )
        if self.locked:
            self.catalog().list_shards(self.shards)

    def shard_for(self, path: str) -> Shard:
        s = shard_of(path, self.shard_count)
        if s not in self.shards:
            raise RuntimeError(f"{path} belongs to shard {s}, which this writer does not own")
        return self.shards[s]

    def commit(self, added: list[NewItem], failed: list[tuple[str, str]]) -> None:
        """A batch to its shards: per shard, vectors fsynced, then one SQLite transaction."""
        by_shard: dict[int, tuple[list[NewItem], list[tuple[str, str]]]] = {}
        for item in added:
            by_shard.setdefault(self.shard_for(item.path).shard, ([], []))[0].append(item)
        for path, error in failed:
            by_shard.setdefault(self.shard_for(path).shard, ([], []))[1].append((path, error))
        for s, (items, failures) in sorted(by_shard.items()):
            self.shards[s].commit_batch(items, failures)

    def diff(
        self, shard: int, files: Iterable[FileStat], roots: Sequence[str]
    ) -> tuple[list[FileStat], int, int, list[tuple[str | None, str]]]:
        """Bring a shard in line with a scan of the folders, short of embedding.

        Items under `roots` whose file is gone are removed (with their failures); files of
        the same size and mtime are kept (relabelled where their folder label changed);
        the rest (new, changed, failed before) is returned to embed.
        Returns (to embed, skipped, removed, the (new label, path) of those relabelled).
        """
        writer = self.shards[shard]
        known = writer.stats()
        here = list(files)
        present = {f.path for f in here}

        def under(path: str) -> bool:
            return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)

        gone = [p for p in known if p not in present and under(p)]
        gone += [p for p, _ in writer.failures() if p not in present and under(p)]
        removed = writer.remove_paths(gone)
        todo, relabel, skipped = [], [], 0
        for f in here:
            row = known.get(f.path)
            if row is not None and (row[1], row[2]) == (f.bytes, f.mtime):
                skipped += 1
                if row[3] != f.label:
                    relabel.append((f.label, f.path))
            else:
                todo.append(f)
        if relabel:
            writer.set_labels(relabel)
        return todo, skipped, removed, relabel

    def remove_paths(self, paths: Iterable[str]) -> int:
        grouped: dict[int, list[str]] = {}
        for p in paths:
            grouped.setdefault(self.shard_for(p).shard, []).append(p)
        return sum(self.shards[s].remove_paths(ps) for s, ps in grouped.items())

    def mark(self, shard: int, key: str) -> None:
        """Record when a shard's pass started or completed (for the last shard to build)."""
        self.shards[shard].db.set_meta({key: repr(time.time())})  # type: ignore[union-attr]

    # the FAISS file
    def build(self, verify: bool = False) -> BuildInfo:
        """Bring the FAISS file into agreement with every shard and write it atomically.

        `verify` reads every vector against its checksum first (`index build`); otherwise
        the blocks the build reads are checked as they are read.

        The index type is `mocoserve.ann.planner`'s choice for the store's size, the index's
        remembered --index-type, --max-index-memory and --on-disk; `plan_build` decides
        whether it is rebuilt, patched, re-tuned or kept.
        """
        if not self.locked:
            raise RuntimeError("building needs the index's writer lock")
        self.list_shards()
        meta = self.meta()
        version = meta.version + 1
        store = ShardedStore(self.path)
        try:
            if verify:
                store.verify()
            n = len(store)
            plan = meta.choice.plan(n, meta.dim, self.flat_limit)
            target = meta.choice.recall_target or RECALL_TARGET
            disk = bool(meta.choice.on_disk) and n > 0
            index = load_faiss(store, self.path, meta.factory, meta.dim, patch=False).index
            stale = missing = np.zeros(0, dtype=np.int64)
            if index is not None and on_disk(index):
                stale, missing = diff_ids(index, store.ids())
            found = FaissFacts(
                index is not None,
                index is not None and on_disk(index),
                index is not None and base_ivf(index) is not None,
                len(stale),
                len(missing),
            )
            decision = plan_build(meta, n, plan, target, disk, found)
            if isinstance(decision, Rebuild):
                index, tuned = self._rebuild(store, decision, meta, target, version)
            else:
                if isinstance(decision, Patch):
                    lists = self._new_lists_path(version)
                    index = patch_on_disk(index, stale, store.vectors(missing), lists)
                retune = isinstance(decision, Retune) or getattr(decision, "retune", False)
                tuned = self._retune(store, index, meta, target) if retune else meta
            apply_settings(index, tuned.settings)
            write_atomic(index, self.path)
        finally:
            store.close()
        return self._record(index, tuned, target, version)

    def _rebuild(
        self, store: ShardedStore, decision: Rebuild, meta: CatalogMeta, target: float, version: int
    ) -> tuple[faiss.Index, CatalogMeta]:
        """A new index, trained and tuned; the catalog's facts of it."""
        if decision.note:
            self.notes.append(decision.note)
        lists = self._new_lists_path(version) if decision.on_disk else None
        built = build_faiss(store, decision.factory, target, lists)
        return built.index, meta.replace(
            factory=built.factory if len(store) else "Flat",
            settings=built.settings,
            tuned_ntotal=len(store),
            recall_at_10=built.recall_at_10 or None,
            qps=built.qps or None,
            tuned_target=target,
            plan_why=decision.why,
        )

    def _retune(
        self, store: ShardedStore, index: faiss.Index, meta: CatalogMeta, target: float
    ) -> CatalogMeta:
        """The search settings tuned anew for `target`; the catalog's facts of them."""
        settings, recall, qps = tune(index, store.vectors, len(store), target, store.gather)
        return meta.replace(
            settings=settings, recall_at_10=recall or None, qps=qps or None, tuned_target=target
        )

    def _record(
        self, index: faiss.Index, tuned: CatalogMeta, target: float, version: int
    ) -> BuildInfo:
        """Drop the lists files no index names, write the build's facts to the catalog."""
        kept = lists_file(index)
        self._drop_old_lists(Path(kept).name if kept else None)
        ram = self.path.stat().st_size
        exact = exact_codes(index) and not on_disk(index)
        built = tuned.replace(
            on_disk_built=bool(kept),
            ram_bytes=ram,
            disk_bytes=Path(kept).stat().st_size if kept else 0,
            gpu_fp16=bool(exact) and tuned.fp16_keeps_target(target),
            index_ntotal=index.ntotal,
            version=version,
            built_at=time.time(),
        )
        self.catalog().set_meta(built.to_meta(BUILT))
        budget = built.choice.max_index_memory
        if budget is not None and ram > budget:
            self.notes.append(
                f"the index takes {show_size(ram)} in RAM, over --max-index-memory "
                f"{show_size(budget)}"
            )
        built = self.meta()
        return BuildInfo(
            index.ntotal,
            built.factory,
            built.settings.nprobe,
            built.recall_at_10,
            version,
            built.describe_build(),
        )

    def _new_lists_path(self, version: int) -> Path:
        """A lists file name no file has (never the one readers map, whatever a crash left)."""
        path, extra = self.files.lists(version), 0
        while path.exists():
            extra += 1
            path = self.files.lists(version, extra)
        return path

    def _drop_old_lists(self, keep: str | None) -> None:
        """Delete on-disk lists files the index no longer names (readers that mapped one
        keep reading it: an unlinked file lives until its last mapping goes)."""
        for old in self.files.lists_files():
            if old.name != keep:
                old.unlink(missing_ok=True)
        for piece in self.files.pieces():
            piece.unlink(missing_ok=True)


def shards_done(index_path: str | Path) -> tuple[bool, float]:
    """Whether every shard has completed a pass since it last started; the newest completion."""
    store = ShardedStore(index_path)
    try:
        newest, done = 0.0, True
        for shard in store.all_shards():
            meta = shard.db.meta() if shard.db is not None else {}
            started, completed = float(meta.get("started", 0)), float(meta.get("completed", 0))
            done &= completed > 0 and completed >= started
            newest = max(newest, completed)
        return done, newest
    finally:
        store.close()
