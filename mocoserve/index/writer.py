"""The write path of an index, in one place: `IndexWriter` and the ingest pipeline.

Whoever changes an index goes through an `IndexWriter`: it takes the index's writer lock
(`out.faiss.lock`) to create, migrate or build; it opens, each under its own lock, the
shards this process writes; it routes committed batches to their shards; and it builds the
FAISS file from every shard. Readers (search, knn, the app, the service) never write.

Ingest is a pipeline after clip-retrieval's reader → mapper → writer: decoding in worker
processes (`decode_files`), the model, and the shard commit, each stage timed.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mocoserve.ann import vectors as vec
from mocoserve.ann.planner import FLAT_LIMIT, IndexChoice, show_size
from mocoserve.core.decode import Decoded, decode_files
from mocoserve.core.errors import UserError
from mocoserve.index.dbfile import format_version
from mocoserve.index.formats import NewItem
from mocoserve.index.store import (
    DTYPES,
    FORMAT_VERSION,
    Catalog,
    DamagedIndex,
    Shard,
    ShardedStore,
    catalog_damage,
    has_index_data,
    migrate,
    refusal,
    shard_missing,
    shard_of,
    shard_path,
    shards_path,
    sidecar_path,
)
from mocoserve.model import PackageEncoder, to_input

ProgressFn = Callable[[int], None]


class FileStat(Protocol):
    """A scanned file: what a rerun compares with what a shard holds."""

    path: str
    label: str | None
    bytes: int
    mtime: int


Sink = Callable[[list[NewItem], list[tuple[str, str]]], None]


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 of a package's manifest.json (which lists every file's sha256)."""
    from mocoserve.core.manifest import sha256_file

    return sha256_file(Path(model_dir) / "manifest.json")


def acquire_lock(index_path: str | Path, wait: bool = False) -> int:
    """The index's writer lock (a file descriptor; closing it releases the lock)."""
    fd = os.open(f"{index_path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{index_path} is being written by another process") from None
    return fd


@dataclass
class IngestCounts:
    """What one pass of the pipeline did, and where its time went."""

    embedded: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    decode_wait_s: float = 0.0  # waiting for decoded images (the reader)
    embed_s: float = 0.0  # the model (the mapper)
    commit_s: float = 0.0  # vectors fsynced, metadata committed (the writer)


def ingest(
    encoder: PackageEncoder,
    paths: Sequence[str],
    labels: Sequence[str | None],
    sink: Sink,
    batch_size: int,
    workers: int,
    progress: ProgressFn | None = None,
) -> IngestCounts:
    """Decode, embed and commit files batch by batch; each batch is durable before the next."""
    label_of = dict(zip(paths, labels, strict=True))
    counts = IngestCounts()
    ready: list[Decoded] = []
    failed: list[tuple[str, str]] = []

    def flush() -> None:
        started = time.perf_counter()
        vectors = (
            vec.normalize(encoder.embed(to_input(np.stack([d.pixels for d in ready]))))
            if ready
            else np.zeros((0, encoder.embedding_dim), dtype=np.float32)
        )
        counts.embed_s += time.perf_counter() - started
        added = [
            NewItem(d.path, label_of[d.path], d.sha256, d.bytes, d.mtime, d.width, d.height, v)
            for d, v in zip(ready, vectors, strict=True)
        ]
        started = time.perf_counter()
        sink(added, failed)
        counts.commit_s += time.perf_counter() - started
        counts.embedded += len(added)
        counts.failed += len(failed)
        counts.failures.extend(failed)
        if progress is not None:
            progress(len(added) + len(failed))
        ready.clear()
        failed.clear()

    decoded = iter(decode_files(paths, encoder.resize, encoder.input_size, workers))
    while True:
        started = time.perf_counter()
        item = next(decoded, None)
        counts.decode_wait_s += time.perf_counter() - started
        if item is None:
            break
        if item.error:
            failed.append((item.path, item.error))
        else:
            ready.append(item)
        if len(ready) >= batch_size:
            flush()
    flush()
    return counts


@dataclass
class BuildInfo:
    """What a build made."""

    items: int
    factory: str
    nprobe: int | None
    recall_at_10: float | None
    version: int
    summary: str = ""  # `describe_build`'s line


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
            db = sidecar_path(self.path)
            if not self.locked and format_version(db) != FORMAT_VERSION:
                raise UserError(f"{self.path} is not ready yet (its builder has not made it)")
            self._catalog = Catalog(db, readonly=not self.locked)
        return self._catalog

    def meta(self) -> dict[str, str]:
        return self.catalog().meta()

    @property
    def shard_count(self) -> int:
        return int(self.catalog().get_meta("shards") or 1)

    def prepare(
        self,
        encoder: PackageEncoder,
        shards: int | None = None,
        store_dtype: str | None = None,
        choice: IndexChoice | None = None,
        labels_from_folders: bool | None = None,
        expected: int = 0,
    ) -> dict[str, str]:
        """Create the index, or migrate (format 1) and check it: the model, dim, shards.

        `shards` and `store_dtype` are fixed when the index is made; given again they must
        match. `choice` (--index-type, --max-index-memory, --recall-target, --on-disk) and
        `labels_from_folders` are remembered for later runs.
        """
        if not self.locked:
            raise RuntimeError("prepare needs the index's writer lock")
        db = sidecar_path(self.path)
        if self.path.exists() and not db.is_file():
            raise UserError(
                f"{self.path} exists and is not an index made by embed (no {db.name}); "
                "choose another --index"
            )
        damage = catalog_damage(self.path)
        if damage and has_index_data(self.path):  # never a new index over the old one's shards
            raise DamagedIndex(
                f"{damage}; the index's data is beside it ({shards_path(self.path).name}): "
                "restore the catalog, or embed into a new --index"
            )
        if format_version(db) == 1:
            moved = migrate(self.path)
            self.notes.append(f"moved {moved} items to the sharded layout (no re-embedding)")
        catalog = self.catalog()
        fingerprint, dim = model_fingerprint(encoder.path), encoder.embedding_dim
        if shards is not None and not 1 <= shards <= 4096:
            raise UserError(f"--shards must be from 1 to 4096, got {shards}")
        if store_dtype is not None and store_dtype not in DTYPES:
            raise UserError(f"--store-dtype must be {' or '.join(DTYPES)}, got {store_dtype!r}")
        meta = catalog.meta()
        if meta.get("model_sha256") is None:
            catalog.set_meta(
                {
                    "format_version": str(FORMAT_VERSION),
                    "model_sha256": fingerprint,
                    "model_path": str(Path(encoder.path).resolve()),
                    "dim": str(dim),
                    "metric": "inner_product",
                    "normalized": "true",
                    "shards": str(shards or 1),
                    "store_dtype": store_dtype or "float32",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
            )
        else:
            if meta["model_sha256"] != fingerprint:
                raise UserError(
                    f"{self.path} was built with a different model (manifest sha256 "
                    f"{meta['model_sha256'][:12]}…, this one {fingerprint[:12]}…); "
                    "embed into a new --index or use the model it was built with"
                )
            if int(meta.get("dim") or dim) != dim:
                raise UserError(
                    f"{self.path} holds {meta['dim']}-d vectors; this model makes {dim}-d"
                )
            made = int(meta.get("shards") or 1)
            if shards is not None and shards != made:
                raise UserError(
                    f"{self.path} was made with {made} shard(s), not {shards}: the shard count "
                    f"is fixed when an index is made (use --shard I/{made})"
                )
            made_dtype = meta.get("store_dtype") or "float32"
            if store_dtype is not None and store_dtype != made_dtype:
                raise UserError(f"{self.path} stores {made_dtype} vectors, not {store_dtype}")
        self.list_shards()
        if choice is not None:
            self.choose(choice, expected)
        if labels_from_folders is not None:
            catalog.set_meta({"labels": "folders" if labels_from_folders else "none"})
        return catalog.meta()

    def list_shards(self) -> None:
        """Refuse a shard the catalog lists that is gone; list the ones made since (a
        torchrun rank's, or any from before the catalog kept the list)."""
        catalog, n = self.catalog(), self.shard_count
        listed = catalog.listed_shards()
        for s in sorted(listed or ()):
            missing = shard_missing(shard_path(self.path, s, n), s)
            if missing:
                raise refusal(missing, self.path)
        present = {s for s in range(n) if (shard_path(self.path, s, n) / "items.db").is_file()}
        if self.locked and (listed is None or not present <= listed):
            catalog.list_shards(present)

    def choose(self, choice: IndexChoice, expected: int = 0) -> None:
        """Remember what the index is to be built as; checked (a UserError) before any work."""
        catalog = self.catalog()
        meta = catalog.meta()
        dim = int(meta.get("dim") or 0)
        if dim:
            remembered = IndexChoice.from_meta(meta).merged(choice)
            n = max(expected, int(meta.get("index_ntotal") or 0), 1)
            vec.new_index(remembered.plan(n, dim, self.flat_limit).factory, dim)
        catalog.set_meta(choice.to_meta())

    def labelled_by_folders(self) -> bool:
        return self.catalog().get_meta("labels") == "folders"

    # the shards this process writes
    def own(self, shard_ids: Iterable[int]) -> None:
        """Open these shards for writing (each under its own lock)."""
        meta = self.meta()
        n, dim = int(meta.get("shards") or 1), int(meta["dim"])
        dtype = meta.get("store_dtype") or "float32"
        listed = self.catalog().listed_shards()
        for s in shard_ids:
            if s not in self.shards:
                required = listed is not None and s in listed  # a lost one is not made anew
                folder = shard_path(self.path, s, n)
                self.shards[s] = Shard(folder, s, n, dim, dtype, writer=True, required=required)
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
        remembered --index-type, --max-index-memory and --on-disk. It is rebuilt (trained
        and tuned anew) when missing, of another kind, moved to or from disk, or when the
        count drifted 10% from the last training; otherwise patched: in memory by id, on
        disk into a new lists file (readers keep the old one until they reopen). Search is
        re-tuned when the recall target changes.
        """
        from mocoserve.index.reader import build_faiss, load_faiss, same_kind

        if not self.locked:
            raise RuntimeError("building needs the index's writer lock")
        self.list_shards()
        catalog = self.catalog()
        meta = catalog.meta()
        store = ShardedStore(self.path)
        version = int(meta.get("version") or 0) + 1
        try:
            if verify:
                store.verify()
            n, dim = len(store), int(meta.get("dim") or 0)
            choice = IndexChoice.from_meta(meta)
            plan = choice.plan(n, dim, self.flat_limit)
            target = choice.recall_target or vec.RECALL_TARGET
            disk = bool(choice.on_disk) and n > 0
            lists_path = self._new_lists_path(version)
            current = meta.get("factory") or "Flat"
            index = load_faiss(store, self.path, current, dim, patch=False).index
            tuned_at = int(meta.get("tuned_ntotal") or 0)
            drifted = abs(n - tuned_at) > 0.1 * max(tuned_at, 1)
            rebuild = (
                index is None
                or not same_kind(current, plan.factory)
                or vec.on_disk(index) != disk
                or (vec.base_ivf(index) is not None and drifted)
            )
            if rebuild:
                factory = plan.factory if not same_kind(current, plan.factory) else current
                if index is not None and not same_kind(current, plan.factory):
                    self.notes.append(f"index type {current} -> {plan.factory} ({plan.why})")
                built = build_faiss(store, factory, target, lists_path if disk else None)
                index, settings = built.index, built.settings
                tuned = {
                    "factory": built.factory if n else "Flat",
                    "tuned_ntotal": str(n),
                    "recall_at_10": f"{built.recall_at_10:.4f}" if built.recall_at_10 else "",
                    "qps": f"{built.qps:.0f}" if built.qps else "",
                    "tuned_target": repr(target),
                    "plan_why": plan.why,
                }
            else:
                if vec.on_disk(index):
                    stale, missing = vec.diff_ids(index, store.ids())
                    if len(stale) or len(missing):
                        index = vec.patch_on_disk(index, stale, store.vectors(missing), lists_path)
                settings, tuned = vec.SearchSettings.from_meta(meta), {}
                if meta.get("tuned_target") != repr(target):
                    settings, recall, qps = vec.tune(index, store.vectors, n, target, store.gather)
                    tuned = {
                        "recall_at_10": f"{recall:.4f}" if recall else "",
                        "qps": f"{qps:.0f}" if qps else "",
                        "tuned_target": repr(target),
                    }
            vec.apply_settings(index, settings)
            vec.write_atomic(index, self.path)
        finally:
            store.close()
        kept = vec.lists_file(index)
        self._drop_old_lists(Path(kept).name if kept else None)
        ram = self.path.stat().st_size
        lists_bytes = Path(kept).stat().st_size if kept else 0
        exact = vec.exact_codes(index) and not vec.on_disk(index)
        catalog.set_meta(
            {
                **tuned,
                **settings.to_meta(),
                "on_disk_built": "true" if kept else "false",
                "ram_bytes": str(ram),
                "disk_bytes": str(lists_bytes),
                "gpu_fp16": "true" if exact and fp16_keeps_target(meta, tuned, target) else "false",
                "index_ntotal": str(index.ntotal),
                "version": str(version),
                "built_at": repr(time.time()),
            }
        )
        budget = choice.max_index_memory
        if budget is not None and ram > budget:
            self.notes.append(
                f"the index takes {show_size(ram)} in RAM, over --max-index-memory "
                f"{show_size(budget)}"
            )
        meta = catalog.meta()
        recall = meta.get("recall_at_10")
        return BuildInfo(
            index.ntotal,
            meta.get("factory") or "Flat",
            settings.nprobe,
            float(recall) if recall else None,
            version,
            describe_build(meta),
        )

    def _new_lists_path(self, version: int) -> Path:
        """A lists file name no file has (never the one readers map, whatever a crash left)."""
        path, extra = self.path.with_name(f"{self.path.name}.lists-{version}"), 0
        while path.exists():
            extra += 1
            path = self.path.with_name(f"{self.path.name}.lists-{version}-{extra}")
        return path

    def _drop_old_lists(self, keep: str | None) -> None:
        """Delete on-disk lists files the index no longer names (readers that mapped one
        keep reading it: an unlinked file lives until its last mapping goes)."""
        for old in self.path.parent.glob(f"{self.path.name}.lists-*"):
            if old.name != keep:
                old.unlink(missing_ok=True)
        for piece in self.path.parent.glob(f".{self.path.name}.lists-*.piece-*"):
            piece.unlink(missing_ok=True)


FP16_RECALL_COST = 0.001  # recall@10 lost by rounding unit vectors to float16 (measured:
# a float16 store keeps 0.9997 of float32's neighbours, docs/benchmarks.md)


def fp16_keeps_target(meta: dict[str, str], tuned: dict[str, str], target: float) -> bool:
    """Whether GPU copies may store float16 (half the GPU memory) for an exact-code index:
    the store is float16 already, or the tuned recall has room for fp16's rounding."""
    if meta.get("store_dtype") == "float16":
        return True
    recall = tuned.get("recall_at_10", meta.get("recall_at_10"))
    return not recall or float(recall) >= target + FP16_RECALL_COST


def build_facts(meta: dict[str, str]) -> dict[str, Any]:
    """What the last build chose and measured, from the catalog."""

    def number(key: str, kind: type = int) -> Any:
        value = meta.get(key)
        return kind(value) if value else None

    return {
        "on_disk": meta.get("on_disk_built") == "true",
        "plan": meta.get("plan_why"),
        "ef_search": number("ef_search"),
        "k_factor": number("k_factor") or 1,
        "recall_at_10": number("recall_at_10", float),
        "recall_target": number("tuned_target", float),
        "qps": number("qps", float),
        "ram_bytes": number("ram_bytes"),
        "disk_bytes": number("disk_bytes"),
        "max_index_memory": number("max_index_memory"),
    }


def describe_build(meta: dict[str, str]) -> str:
    """One line: the index type, its bytes, and recall/QPS as tuned."""
    facts = build_facts(meta)
    parts = [meta.get("factory") or "Flat"]
    if facts["ram_bytes"] is not None:
        parts.append(f"{show_size(facts['ram_bytes'])} in RAM")
    if facts["on_disk"] and facts["disk_bytes"] is not None:
        parts.append(f"{show_size(facts['disk_bytes'])} of lists on disk")
    settings = vec.SearchSettings.from_meta(meta).describe()
    if facts["recall_at_10"] is not None:
        tuned = f"recall@10 {facts['recall_at_10']:.3f}"
        parts.append(f"{tuned} at {settings}" if settings else tuned)
    if facts["qps"]:
        parts.append(f"{facts['qps']:,.0f} queries/s on the CPU")
    return ", ".join(parts)


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
