"""`embed_folders`: image folders or tar shards -> an index, resumable, incremental, on one or
many processes.

A run scans its source (a `FolderSource`, or a `TarSource` for tar shards: the same
pipeline, a second reader), compares every file's size and mtime with what its shard holds,
removes what was deleted, embeds what is new or changed (and what failed before), and
builds the FAISS file. Killed at any point, the next run picks up after the last committed
batch. Three ways to run it, the same index either way:

- one process: it writes every shard and builds;
- `torchrun --nproc_per_node 8 -m mocoserve embed ...`: rank r writes the shards s with
  s % world == r (on GPU `LOCAL_RANK`; a tar's items are all in one shard, so whole tars
  go to a rank); rank 0 made the index and builds it after every rank
  has finished (the process group only agrees: no vector travels through it);
- `mocoserve embed ... --shard I/N` (a SLURM array task, or hosts that share only a file
  system): shard I, then stop; the last shard to finish builds (or `mocoserve index build`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mocoserve.ann.planner import FLAT_LIMIT, IndexChoice, parse_size
from mocoserve.core.cluster import Group
from mocoserve.core.decode import default_workers
from mocoserve.core.errors import RunError, UserError
from mocoserve.core.manifest import ModelFacts
from mocoserve.core.streams import STALL_SECONDS
from mocoserve.core.tars import PIPE, is_shard_spec, shard_key
from mocoserve.index.catalog import CatalogMeta
from mocoserve.index.files import IndexFiles
from mocoserve.index.formats import open_store
from mocoserve.index.store import ShardedStore, shard_of
from mocoserve.index.writer import IndexWriter, shards_done
from mocoserve.ingest.runner import Runner
from mocoserve.ingest.scan import FolderSource, ImageSource
from mocoserve.ingest.tarsource import TarSource
from mocoserve.model import PackageEncoder, load


@dataclass
class ShardSummary:
    """One shard's part of a run."""

    shard: int
    rank: int = 0
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    removed: int = 0


@dataclass
class EmbedSummary:
    """What an embed run did and what the index holds now."""

    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    removed: int = 0
    relabelled: int = 0  # kept items whose folder label changed to another label
    unlabelled: int = 0  # ... and those that lost theirs (embedded from below their folder)
    total: int = 0
    labelled: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    factory: str = ""
    nprobe: int | None = None
    recall_at_10: float | None = None
    index_line: str = ""  # what the index is: type, bytes, recall, queries/s
    provider: str = ""
    built: bool = False  # this process built the FAISS file
    shards: list[ShardSummary] = field(default_factory=list)
    rates: dict[int, float] = field(default_factory=dict)  # rank -> images/s
    stages: dict[str, float] = field(default_factory=dict)  # scan, decode_wait, embed, commit (s)
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.embedded + self.failed) / self.seconds if self.seconds > 0 else 0.0


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N), with 0 <= I < N."""
    left, sep, right = text.partition("/")
    if not sep or not left.strip().isdigit() or not right.strip().isdigit():
        raise UserError(f"--shard takes I/N (e.g. 3/8), got {text!r}")
    i, n = int(left), int(right)
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: I must be from 0 to N-1")
    return i, n


def _stored_model(index_path: Path) -> str | None:
    if not IndexFiles(index_path).catalog.is_file():
        return None
    store = open_store(index_path)
    try:
        return CatalogMeta.of(store).model_path
    finally:
        store.close()


def embed_folders(
    roots: Sequence[str | Path],
    model: str | Path | None,
    index_path: str | Path,
    batch_size: int = 64,
    workers: int | None = None,
    index_type: str | None = None,
    labels_from_folders: bool | None = None,
    device: str = "auto",
    backend: str = "auto",
    flat_limit: int = FLAT_LIMIT,
    on_start: Callable[[int, str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    shard: tuple[int, int] | None = None,
    shards: int | None = None,
    store_dtype: str | None = None,
    group: Group | None = None,
    max_index_memory: str | int | None = None,
    recall_target: float | None = None,
    on_disk: bool | None = None,
    label_key: str | None = None,
    stream_timeout: float = STALL_SECONDS,
) -> EmbedSummary:
    """Embed every image under `roots` into the index at `index_path` (created if new).

    `roots`: image folders (or files), or tar shards (`core.tars.is_shard_spec`: shard files,
    brace patterns, folders of shards, shards.json, pipe: commands), labelled by their
    json's `label_key` field (img2dataset's metadata) or, by default, their json's label or
    cls part; `labels_from_folders=False` drops a shard's labels. A pipe: command whose read
    waits `stream_timeout` seconds is stopped and its shard recorded as failed.

    `index_type`, `max_index_memory` ('4G' or bytes), `recall_target` and `on_disk`: None
    keeps what the index remembers (auto, no budget, 0.95, in memory for a new one).
    `labels_from_folders` None keeps how the index was labelled (the catalog remembers):
    True labels every item by its top-level folder, False drops the labels.
    `shard` (I, N): write shard I of N only. `shards` and `store_dtype` (float32 or float16)
    are fixed when an index is made. `on_start(todo, provider)` and `on_progress(n)` drive a
    progress bar.
    """
    started = time.perf_counter()
    tar_source = _check_request(roots, batch_size, label_key, labels_from_folders, stream_timeout)
    index_path = Path(index_path)
    budget = parse_size(max_index_memory) if isinstance(max_index_memory, str) else max_index_memory
    choice = IndexChoice(index_type, budget, recall_target, on_disk)
    if not index_path.parent.is_dir():
        raise UserError(f"folder {index_path.parent} does not exist (for --index {index_path})")
    group = group or Group.from_env()
    if group.distributed and shard is not None:
        raise UserError("--shard is for separate processes; under torchrun the ranks share shards")
    model = model if model is not None else _stored_model(index_path)
    if model is None:
        raise UserError("a new index needs --model (the package folder made by export)")
    # the package is verified (sha256s, its manifest against the model) before any file of
    # the index is written: a bad package leaves nothing behind
    encoder = load(model, backend, device, device_id=group.local_rank)
    facts = ModelFacts.of_package(encoder.path)
    count = _shard_count(index_path, shard, shards, group)

    writer: IndexWriter | None = None
    summary = EmbedSummary(provider=encoder.provider)
    try:
        # 1. the catalog: made, migrated and checked under the index lock, by one process
        writer = _open_writer(
            index_path,
            group,
            shard,
            flat_limit,
            summary,
            lambda w: w.prepare(facts, count, store_dtype, choice, labels_from_folders),
        )
        # 2. this process's shards: diff against the folders, remove, relabel, ingest
        n = writer.shard_count
        mine = [shard[0]] if shard else [s for s in range(n) if s % group.world == group.rank]
        source = tar_source or FolderSource(roots, writer.labelled_by_folders())
        pipeline = Pipeline(encoder, batch_size, workers, on_start, on_progress)
        _embed_everywhere(writer, group, mine, source, pipeline, summary)
        # 3. the FAISS file: built by rank 0 (after every rank has finished: the gather in 2)
        if writer.locked:
            _build(writer, summary)
        elif shard is not None:
            _build_if_last(index_path, flat_limit, shard, summary)
        _totals(index_path, summary)
    finally:
        if writer is not None:
            writer.close()
    summary.seconds = time.perf_counter() - started
    summary.rates[group.rank] = summary.images_per_second
    return summary


def _check_request(
    roots: Sequence[str | Path],
    batch_size: int,
    label_key: str | None,
    labels_from_folders: bool | None,
    stream_timeout: float = STALL_SECONDS,
) -> TarSource | None:
    """Refuse a bad request before any file of the index is made (a mistyped folder or shard
    leaves no empty index behind); the tar source, when the roots name tar shards."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if not stream_timeout > 0:
        raise UserError(f"--stream-timeout must be positive, got {stream_timeout}")
    if not roots:
        raise UserError("give at least one image folder")
    shards = [is_shard_spec(r) for r in roots]
    if any(shards):
        if not all(shards):
            raise UserError("give image folders or tar shards, not both, to one embed run")
        labels = labels_from_folders is not False
        return TarSource(roots, label_key, labels=labels, stall_s=stream_timeout)
    if label_key is not None:
        raise UserError("--label-key names a json field of tar shards; these are image folders")
    for root in roots:
        if not Path(root).exists():
            raise UserError(f"{root} does not exist")
    return None


def _shard_count(
    index_path: Path, shard: tuple[int, int] | None, shards: int | None, group: Group
) -> int | None:
    """The shard count to make or check: fixed when the index is made (by default one per
    process of the run); None: as the index has it."""
    if shard is not None:
        return shard[1]
    if shards is not None:
        return shards
    return group.world if not IndexFiles(index_path).catalog.exists() else None


def _open_writer(
    index_path: Path,
    group: Group,
    shard: tuple[int, int] | None,
    flat_limit: int,
    summary: EmbedSummary,
    prepare: Callable[[IndexWriter], object],
) -> IndexWriter:
    """This process's writer, after rank 0 has prepared the catalog under the index lock
    (a refusal there is every rank's). Rank 0 keeps the lock unless it is a --shard task."""
    writer: IndexWriter | None = None
    verdict = None
    if group.rank == 0:
        try:
            writer = IndexWriter(
                index_path, lock=True, wait=shard is not None, flat_limit=flat_limit
            )
            prepare(writer)
            summary.notes += writer.notes
            if shard is not None:  # a --shard task holds the lock only to prepare
                writer.own([shard[0]])  # made and listed in the catalog under the lock
                writer.close()
                writer = None
        except BaseException as e:
            if writer is not None:
                writer.close()
            if not isinstance(e, UserError):
                raise
            verdict = str(e)
    verdict = group.broadcast(verdict)
    if verdict is not None:
        raise UserError(verdict)
    return writer or IndexWriter(index_path, lock=False, flat_limit=flat_limit)


@dataclass
class Pipeline:
    """How this process embeds: the model, the batch size, the decoders, the progress calls."""

    encoder: PackageEncoder
    batch_size: int
    workers: int | None
    on_start: Callable[[int, str], None] | None = None
    on_progress: Callable[[int], None] | None = None


def _embed_everywhere(
    writer: IndexWriter,
    group: Group,
    mine: list[int],
    source: ImageSource,
    pipeline: Pipeline,
    summary: EmbedSummary,
) -> None:
    """This process's shards, then every rank's outcome: the first error is the run's."""
    status: dict = {"rank": group.rank}
    try:
        _embed_shards(writer, mine, source, pipeline, summary)
        status["summary"] = asdict(summary)
    except (UserError, RunError, OSError) as e:
        status["error"] = f"{type(e).__name__}: {e}"
        if not group.distributed:
            raise
    statuses = group.gather(status)
    failed = [s for s in statuses if "error" in s]
    if failed:
        first = failed[0]
        message = first["error"].split(": ", 1)[1]
        raise RunError(f"rank {first['rank']}: {message}" if group.distributed else message)
    if group.distributed:
        _combine(summary, [s["summary"] for s in statuses])


def _embed_shards(
    writer: IndexWriter,
    mine: list[int],
    source: ImageSource,
    pipeline: Pipeline,
    summary: EmbedSummary,
) -> None:
    """Diff these shards against the source (remove, relabel), then embed what is left."""
    n = writer.shard_count
    writer.own(mine)
    for s in mine:
        writer.mark(s, "started")
    owned = set(mine)
    found = source.scan(keep=lambda key: shard_of(key, n) in owned)
    todo = []
    for s in mine:
        here = [f for f in found if shard_of(f.path, n) == s]
        part_todo, skipped, removed, relabel = writer.diff(s, here, source.roots)
        todo += part_todo
        summary.shards.append(ShardSummary(s, skipped=skipped, removed=removed))
        summary.unlabelled += sum(1 for label, _ in relabel if label is None)
        summary.relabelled += sum(1 for label, _ in relabel if label is not None)
    by_shard = {p.shard: p for p in summary.shards}
    if isinstance(source, TarSource):
        _stream_unchanged(writer, mine, source, by_shard)
    if pipeline.on_start is not None:
        pipeline.on_start(len(todo), pipeline.encoder.provider)
    workers = default_workers() if pipeline.workers is None else pipeline.workers

    def commit(added: list, failed: list[tuple[str, str]]) -> None:
        writer.commit(added, failed)
        for item in added:
            by_shard[shard_of(item.path, n)].embedded += 1
        for key, _ in failed:
            by_shard[shard_of(key, n)].failed += 1

    runner = Runner.for_encoder(
        pipeline.encoder, commit, pipeline.batch_size, workers, pipeline.on_progress
    )
    counts = runner.run(source.read(todo))
    listed = source.failures  # a tar's damage, found while listing or streaming it
    if listed:
        commit([], listed)
    summary.skipped = sum(p.skipped for p in summary.shards)
    summary.removed = sum(p.removed for p in summary.shards)
    summary.embedded, summary.failed = counts.embedded, counts.failed + len(listed)
    summary.stages = {
        "scan": source.time.seconds,
        "decode_wait": counts.decode_wait_s,
        "embed": counts.embed_s,
        "commit": counts.commit_s,
    }
    for s in mine:
        writer.mark(s, "completed")
    summary.failures = sorted(f for s in mine for f in writer.shards[s].failures())


def _stream_unchanged(
    writer: IndexWriter, mine: list[int], source: TarSource, by_shard: dict[int, ShardSummary]
) -> None:
    """A pipe: shard has no size or mtime: its members already held at the same size are
    skipped as they stream by; its failure from an earlier run is forgotten (it streams again)."""
    n = writer.shard_count
    streams = [s for s in source.shards if s.startswith(PIPE)]
    mine_set = set(mine)
    urls = [shard_key(u) for u in streams if shard_of(shard_key(u), n) in mine_set]
    if not urls:
        return
    writer.remove_paths(urls)
    known = {}
    for s in mine:
        known.update(writer.shards[s].stats())

    def unchanged(key: str, size: int) -> bool:
        row = known.get(key)
        if row is None or (row[1], row[2]) != (size, 0):
            return False
        by_shard[shard_of(key, n)].skipped += 1
        return True

    source.unchanged = unchanged


def _combine(summary: EmbedSummary, parts: list[dict]) -> None:
    """Rank 0's view of the whole run: every rank's counts, shards, rates and failures."""
    for key in ("embedded", "skipped", "failed", "removed", "relabelled", "unlabelled"):
        setattr(summary, key, sum(p[key] for p in parts))
    summary.shards = sorted(
        (ShardSummary(**{**s, "rank": r}) for r, p in enumerate(parts) for s in p["shards"]),
        key=lambda s: s.shard,
    )
    summary.failures = sorted(tuple(f) for p in parts for f in p["failures"])
    summary.stages = {
        k: max(p["stages"].get(k, 0.0) for p in parts)
        for k in ("scan", "decode_wait", "embed", "commit")
    }
    summary.rates = {r: p["embedded"] / max(p["seconds"], 1e-9) for r, p in enumerate(parts)}


def _build(writer: IndexWriter, summary: EmbedSummary) -> None:
    built = writer.build()
    summary.built = True
    summary.factory, summary.nprobe, summary.recall_at_10 = (
        built.factory,
        built.nprobe,
        built.recall_at_10,
    )
    summary.notes += writer.notes


def _build_if_last(
    index_path: Path, flat_limit: int, shard: tuple[int, int], summary: EmbedSummary
) -> None:
    """A --shard task: build when every shard has completed a pass, unless built since."""
    done, newest = shards_done(index_path)
    if not done:
        summary.notes.append(
            f"shard {shard[0]} of {shard[1]} done; the last shard to finish builds the index "
            f"(or: mocoserve index build {index_path})"
        )
        return
    with IndexWriter(index_path, lock=True, wait=True, flat_limit=flat_limit) as writer:
        if writer.meta().built_at >= newest:
            summary.notes.append("the index was built by another shard meanwhile")
            return
        _build(writer, summary)


def _totals(index_path: Path, summary: EmbedSummary) -> None:
    store = ShardedStore(index_path)
    try:
        summary.total = len(store)
        summary.labelled = store.labelled()
        meta = CatalogMeta.of(store)
        summary.factory = summary.factory or meta.factory
        summary.index_line = meta.describe_build()
        if meta.settings.nprobe:
            summary.nprobe = meta.settings.nprobe
            summary.recall_at_10 = meta.recall_at_10
    finally:
        store.close()
