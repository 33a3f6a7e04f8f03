"""Training from streamed tar shards (`pipe:` commands): no offsets, so no random access.

When any shard of `--data` is a `pipe:` command, the run reads every shard front to back:

- **Counting, once per run.** The run must know each shard's sample count (its steps per
  epoch, its learning-rate schedule, whole batches on every rank). Rank 0 streams every shard
  once without decoding, 8 at a time, and keeps the counts and class names in
  `<out>/stream-counts.json`; a resumed run reads them from there. A shard that streams
  another count later (it changed under the run) stops the run by name.
- **Layout.** Shards are dealt to `world x W` slots, W the data workers per process (at
  most `shards // world`): shard j goes to slot `j % slots`, slot s to rank `s % world` and
  worker `s // world`. The deal is fixed for the run; every epoch each slot streams its
  shards in an order drawn from `(seed, epoch, slot)` through a shuffle buffer
  (`data.shuffle_buffer` samples) drawn from the same. Fewer shards than processes is an
  error.
- **Whole batches.** A slot yields whole batches only (its last partial batch is dropped).
  A process takes its workers' batches in turn (the DataLoader's order); every process runs
  the smallest process's batch count, so all take part in every step. What a larger share
  holds beyond it is not trained that epoch: the last samples of that epoch's order, other
  ones every epoch.
- **Augmentation** is seeded by `(seed, epoch, sample)`, a sample numbered by its place in
  the listing (shards in the order given, members in tar order), as for files read by offset.
- **Resume by replay.** A saved mid-epoch position is a batch count. Each worker streams
  its shards again and passes over the samples its share of those batches took without
  decoding them, and the process's workers take turns from where the interrupted run was:
  the run goes on bit-identically (same weights and queue as an uninterrupted run). Another
  layout (processes, workers, batch, seed or data) goes on after as many samples, a note says.
- **Streams that fail** are tried 3 times (the samples already read are passed over); a
  command that stalls for `data.stream_timeout` seconds is stopped (core.streams). A sample
  whose image does not decode is replaced by the next one that does (32 in a row stop the run).
"""

from __future__ import annotations

import io
import multiprocessing.util
import os
import re
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from mocoserve.core import streams, tars
from mocoserve.core.errors import UserError
from mocoserve.core.files import path_text
from mocoserve.core.images import load_rgb
from mocoserve.train import distributed
from mocoserve.train.data import (
    LIST_THREADS,
    MAX_DECODE_ATTEMPTS,
    EpochPosition,
    seeded_transform,
)

COUNTS_FILE = "stream-counts.json"
COUNTS_KIND = "mocoserve-stream-counts"
TRIES = 3  # a shard's stream is read this many times before the run stops


def is_streamed(shards: Sequence[str]) -> bool:
    return any(s.startswith(tars.PIPE) for s in shards)


@dataclass
class StreamIndex:
    """Streamed shards: each one's sample count and the class names their labels use."""

    root: str
    shards: list[str]
    counts: np.ndarray  # int64 samples per shard
    classes: list[str]  # sorted; empty: unlabelled
    label_key: str | None = None
    unlabelled: int = 0  # samples without a label (then the whole set is unlabelled)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    @property
    def starts(self) -> np.ndarray:
        """Each shard's first sample number."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.counts.sum())

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": COUNTS_KIND,
            "version": 1,
            "root": self.root,
            "label_key": self.label_key,
            "shards": self.shards,
            "counts": [int(c) for c in self.counts],
            "classes": self.classes,
            "unlabelled": self.unlabelled,
        }


def scan_streams(
    spec: str,
    shards: list[str],
    out: Path,
    label_key: str | None,
    stall_s: float,
    listed: str | None = None,
    stop: Callable[[], str | None] | None = None,
) -> StreamIndex:
    """The counts of streamed shards: from `listed` (a shards.json, data.shard_counts) when
    given, else `<out>/stream-counts.json` when it lists the same shards and label key, else
    by streaming each once (on rank 0; every rank gets them)."""
    empty = next((s for s in shards if s.startswith(tars.PIPE) and not s[5:].strip()), None)
    if empty is not None:
        raise UserError(f"{spec}: a shard is {empty!r}, with no command after pipe:")

    def compute() -> StreamIndex:
        if listed is not None:
            return counts_from_list(spec, shards, Path(listed), label_key)
        cached = _read_counts(out / COUNTS_FILE, shards, label_key)
        if cached is not None:
            return cached
        index = count_streams(spec, shards, label_key, stall_s, stop)
        out.mkdir(parents=True, exist_ok=True)
        tars._write_json(out / COUNTS_FILE, index.to_dict())
        return index

    index = distributed.from_rank0(compute)
    index.root = spec
    return index


def _read_counts(path: Path, shards: list[str], label_key: str | None) -> StreamIndex | None:
    if not path.is_file():
        return None
    data = tars._read_json(path, "stream count file")

    def count(c: object) -> bool:  # a JSON integer (not true/false, "5" or 5.5), in int64
        return type(c) is int and 0 <= c < 2**62

    try:
        ok = data["kind"] == COUNTS_KIND and len(data["counts"]) == len(data["shards"])
        ok = ok and isinstance(data["counts"], list) and all(map(count, data["counts"]))
        ok = ok and isinstance(data["classes"], list) and count(data["unlabelled"])
        ok = ok and all(isinstance(c, str) for c in data["classes"])
        counts = np.asarray(data["counts"] if ok else [], np.int64)
    except (KeyError, TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise UserError(
            f"{path_text(path)} is damaged (not a stream count file); delete it to count the "
            "shards again"
        )
    if data["shards"] != shards or data.get("label_key") != label_key:
        return None  # other data: counted again (and the file replaced)
    print(f"shard counts from {path_text(path)}", file=sys.stderr)
    return StreamIndex(
        str(data.get("root")), shards, counts, list(data["classes"]), label_key, data["unlabelled"]
    )


def counts_from_list(
    spec: str, shards: list[str], path: Path, label_key: str | None
) -> StreamIndex:
    """Counts (and classes) from a shards.json, e.g. the one `mocoserve shards` wrote before
    the set was uploaded: no counting pass, which a billion images cannot afford. Each
    shard is the entry whose file name is a word of its command (`.../shard-000001.tar -`).
    Only numbers are read from the file; the commands are the command line's."""
    data = tars._read_json(path, "shard list")
    entries = data.get("shardlist") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict)
        and isinstance(e.get("url"), str)
        and isinstance(e.get("nsamples"), int)
        and not isinstance(e.get("nsamples"), bool)
        and e["nsamples"] >= 0
        for e in entries
    ):
        raise UserError(
            f"data.shard_counts: {path_text(path)} is not a shard list with counts (a "
            "shardlist of {url, nsamples}, as mocoserve shards writes)"
        )
    if label_key is not None:
        raise UserError(
            "--label-key with data.shard_counts: the list holds no class names of that field; "
            "drop data.shard_counts to collect them by streaming"
        )
    by_name: dict[str, int] = {}
    for e in entries:
        by_name.setdefault(Path(e["url"]).name, e["nsamples"])
    counts = []
    for url in shards:
        words = {w for w in re.split(r"[^\w.+-]+", url) if w}
        names = sorted(words & by_name.keys())
        if len(names) != 1:
            found = "no shard it lists" if not names else f"several ({', '.join(names[:3])})"
            raise UserError(
                f"data.shard_counts: {url} names {found} of {path_text(path)} (a shard is "
                "matched by its file name)"
            )
        counts.append(by_name[names[0]])
    extra = data.get("mocoserve") if isinstance(data.get("mocoserve"), dict) else {}
    classes = extra.get("classes") if isinstance(extra.get("classes"), list) else []
    if not all(isinstance(c, str) for c in classes):
        raise UserError(f"data.shard_counts: {path_text(path)} has class names that are not text")
    array = np.asarray(counts, np.int64)
    if int(array.sum()) == 0:
        raise UserError(f"data.shard_counts: {path_text(path)} counts no samples for {spec}")
    print(f"shard counts from {path_text(path)} (not counted)", file=sys.stderr)
    unlabelled = 0 if classes else int(array.sum())
    return StreamIndex(spec, shards, array, sorted(classes), None, unlabelled)


@dataclass
class _ShardCount:
    n: int
    names: set[str]
    missing: int
    first_missing: str | None


def count_streams(
    spec: str,
    shards: list[str],
    label_key: str | None,
    stall_s: float,
    stop: Callable[[], str | None] | None = None,
) -> StreamIndex:
    """Stream every shard once (8 at a time), counting samples and collecting label names.
    A shard that fails, or `stop()` naming a reason (a signal), ends the pass at once: the
    other commands are stopped, none is left running."""
    print(
        f"counting the samples of {len(shards)} streamed shard(s) (once per run: the count is "
        f"kept in the run folder's {COUNTS_FILE})",
        file=sys.stderr,
    )
    started = time.monotonic()

    stopping = threading.Event()

    def one(url: str) -> _ShardCount:
        c = _ShardCount(0, set(), 0, None)
        for sample in _read_shard(url, label_key, stall_s, with_data=False, stopping=stopping):
            c.n += 1
            if sample.label is None:
                c.missing += 1
                c.first_missing = c.first_missing or sample.key
            else:
                c.names.add(sample.label)
        return c

    pool = ThreadPoolExecutor(min(LIST_THREADS, len(shards)))
    futures = [pool.submit(one, url) for url in shards]
    try:
        while not all(f.done() for f in futures):
            wait(futures, timeout=0.5, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f.done() and f.exception() is not None]
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
            why = stop() if stop is not None else None
            if why:
                raise UserError(
                    f"stopped by {why} while counting the streamed shards, before training "
                    "(nothing to resume: the next run counts them again)"
                )
        found = [f.result() for f in futures]
    finally:
        if not all(f.done() for f in futures):
            stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
            streams.stop_all()  # the reads waiting on commands end
        pool.shutdown(wait=True)
    counts = np.asarray([c.n for c in found], np.int64)
    total = int(counts.sum())
    if total == 0:
        raise UserError(f"no images in the shards of {spec}")
    print(f"counted {total} samples in {time.monotonic() - started:.1f} s", file=sys.stderr)
    missing = sum(c.missing for c in found)
    if missing:
        if label_key is not None:
            where = next(
                (url, c.first_missing) for url, c in zip(shards, found, strict=True) if c.missing
            )
            raise UserError(
                f"--label-key {label_key}: {missing} of {total} samples of {spec} have no json "
                f"field {label_key!r} (the first: {where[1]} in {where[0]})"
            )
        return StreamIndex(spec, shards, counts, [], label_key, missing)
    classes = sorted(set().union(*(c.names for c in found)))
    return StreamIndex(spec, shards, counts, classes, label_key)


def _read_shard(
    url: str,
    label_key: str | None,
    stall_s: float,
    with_data: bool = True,
    stopping: threading.Event | None = None,
) -> Iterator[Any]:
    """A shard's samples: a failed stream is read again (TRIES times in all) from where it
    failed; then the run stops naming it. `stopping` set: ends, not read again."""
    done, tries = 0, 0
    while True:
        try:
            seen = 0
            for sample, data in tars.stream_samples(url, label_key, stall_s):
                seen += 1
                if seen <= done:
                    continue
                if stopping is not None and stopping.is_set():
                    return
                done += 1
                yield (sample, data) if with_data else sample
            return
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            if stopping is not None and stopping.is_set():
                return
            tries += 1
            if tries >= TRIES:
                then = (
                    "the last checkpoint holds the run: fix the source and resume with "
                    "--resume auto"
                    if with_data
                    else "while counting the shards, before training: fix the source"
                )
                raise UserError(f"{url}: {tars._first_line(e)} ({TRIES} tries; {then})") from None
            print(
                f"warning: {url}: {tars._first_line(e)}; reading it again from sample {done}",
                file=sys.stderr,
            )
            if stopping is not None:
                stopping.wait(2 ** (tries - 1))
            else:
                time.sleep(2 ** (tries - 1))


class StreamPlan(EpochPosition):
    """The sampler's part for streamed shards (see the module doc): the deal of shards to
    ranks and workers, each worker's batches per epoch, and the mid-epoch position.

    Offers EpochSampler's interface to the trainer (EpochPosition's batches_per_epoch,
    set_epoch and load_state_dict; state_dict for checkpoints, resume_position).
    """

    def __init__(
        self, counts: np.ndarray, batch_size: int, seed: int, workers: int, buffer: int
    ) -> None:
        self.world, self.rank = distributed.world_size(), distributed.rank()
        shards = len(counts)
        if shards < self.world:
            raise UserError(
                f"{shards} streamed shard(s) cannot feed {self.world} processes: each process "
                "reads whole shards (write more, smaller shards: mocoserve shards --shard-size)"
            )
        self.batch_size, self.seed, self.buffer = batch_size, seed, buffer
        self.n = int(counts.sum())
        self.workers = max(1, min(workers, shards // self.world))  # streams per process
        self.loader_workers = 0 if workers == 0 else self.workers
        slots = self.world * self.workers
        self.slot_shards = [list(range(s, shards, slots)) for s in range(slots)]
        batches = np.asarray([int(counts[j].sum()) // batch_size for j in self.slot_shards])
        per_rank = [int(batches[r :: self.world].sum()) for r in range(self.world)]
        self.batches_per_epoch = min(per_rank)
        if self.batches_per_epoch == 0:
            raise UserError(
                f"the streamed shards hold too few samples for one batch of {batch_size} on "
                f"each of {self.world} process(es) from whole shards per data worker "
                f"({self.n} samples in {shards} shards); lower --batch-size or --workers"
            )
        # the order this rank's workers' batches come in (the DataLoader's: each in turn)
        mine = [int(batches[w * self.world + self.rank]) for w in range(self.workers)]
        self.turns = _turns(mine, self.batches_per_epoch)
        self._start_position()

    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "n": self.n,
            "global_batch": self.global_batch,
            "streams": self.world * self.workers,
            "buffer": self.buffer,
        }

    def resume_position(self, epoch_step: int) -> tuple[int, str | None]:
        """The batch to go on from: the same one in the same layout, else after as many
        samples (with a note)."""
        saved = self.saved_layout
        if saved is None or epoch_step == 0:
            return epoch_step, None
        if saved == self.state_dict():
            return epoch_step, None
        skip = self.batches_after(epoch_step, saved.get("global_batch", self.global_batch))
        return skip, (
            "the streamed layout changed since the checkpoint (processes, data workers, batch, "
            f"shuffle buffer, seed or data): the epoch goes on after {skip * self.global_batch}"
            f" of its samples, not the same ones"
        )

    def worker_part(self, loader_worker: int) -> tuple[int, int, int]:
        """For the DataLoader's worker `loader_worker` this epoch: the slot it streams, the
        samples it passes over (taken before the resume point) and the batches it yields."""
        k, turns = self.skip_batches, self.turns
        done = np.bincount(turns[:k], minlength=self.workers)
        total = np.bincount(turns, minlength=self.workers)
        # the interrupted run's next turn was worker turns[k]: the loader's worker 0 takes it
        first = int(turns[k]) if k < len(turns) else 0
        w = (first + loader_worker) % self.workers
        return w * self.world + self.rank, int(done[w]) * self.batch_size, int(total[w] - done[w])


def _turns(batches: list[int], steps: int) -> np.ndarray:
    """Which worker gives each of the first `steps` batches when workers take turns and one
    with no batch left is passed over (the DataLoader's order for iterable datasets)."""
    left, out, w = list(batches), [], 0
    while len(out) < steps:
        if left[w] > 0:
            left[w] -= 1
            out.append(w)
        w = (w + 1) % len(left)
    return np.asarray(out, np.int64)


_guarded_pid: int | None = None  # the worker process whose commands are guarded


def _stop_commands_with_the_worker() -> None:
    """In a DataLoader worker: its pipe: commands (their own process groups) end with it.

    A worker leaves by os._exit at shutdown, past any generator's finally: a multiprocessing
    finaliser (run before that exit) stops the commands. A worker whose trainer died
    (SIGKILL, OOM) is re-parented; a thread that sees it stops the commands and ends the
    worker, so no command outlives the run.
    """
    global _guarded_pid
    if _guarded_pid == os.getpid():
        return
    _guarded_pid = os.getpid()
    multiprocessing.util.Finalize(None, streams.stop_all, exitpriority=100)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        streams.stop_all()
        os._exit(1)  # nobody takes this worker's batches: no read again, no new command

    threading.Thread(target=watch, name="stream-parent-watch", daemon=True).start()


class StreamDataset(IterableDataset):
    """One DataLoader worker's part of an epoch: its slot's shards in the epoch's order,
    through the shuffle buffer, past the samples done before a resume, decoded and seeded."""

    def __init__(
        self, index: StreamIndex, plan: StreamPlan, transform: Callable, stall_s: float
    ) -> None:
        self.index, self.plan, self.transform, self.stall_s = index, plan, transform, stall_s
        self.number = {name: i for i, name in enumerate(index.classes)}

    def __iter__(self) -> Iterator[tuple[object, int]]:
        info = get_worker_info()
        if info is not None:
            _stop_commands_with_the_worker()
        plan = self.plan
        slot, skip, batches = plan.worker_part(info.id if info is not None else 0)
        want = batches * plan.batch_size
        if want == 0:
            return
        samples = self._shuffled(slot, plan.epoch)
        yield from self._decoded(samples, skip, want, plan.epoch)

    def _shuffled(self, slot: int, epoch: int) -> Iterator[tuple[int, Any, bytes]]:
        """(sample number, TarSample, bytes) of the slot's shards, shuffled by `buffer`."""
        plan, starts = self.plan, self.index.starts
        rng = np.random.default_rng([plan.seed, epoch, slot])
        order = [plan.slot_shards[slot][i] for i in rng.permutation(len(plan.slot_shards[slot]))]
        held: list[tuple[int, Any, bytes]] = []
        for j in order:
            for n, (sample, data) in enumerate(self._shard(j)):
                item = (int(starts[j]) + n, sample, data)
                if len(held) < plan.buffer:
                    held.append(item)
                    continue
                i = int(rng.integers(len(held)))
                yield held[i]
                held[i] = item
        for i in rng.permutation(len(held)):
            yield held[i]

    def _shard(self, j: int) -> Iterator[tuple[Any, bytes]]:
        url, expected = self.index.shards[j], int(self.index.counts[j])
        n = 0
        for pair in _read_shard(url, self.index.label_key, self.stall_s):
            n += 1
            if n > expected:
                break
            yield pair
        if n != expected:
            now = f"more than {expected}" if n > expected else str(n)
            raise UserError(
                f"{url} now streams {now} samples; the run counted {expected} when it started "
                "(the shard changed): restore it, or start a new run in another folder"
            )

    def _decoded(
        self, samples: Iterator[tuple[int, Any, bytes]], skip: int, want: int, epoch: int
    ) -> Iterator[tuple[object, int]]:
        """Samples `skip`.. `skip + want` of the stream, decoded; one that does not decode
        takes the next one that does (its own seed, the other's image and label)."""
        pending: list[int] = []  # sample numbers waiting for a decodable image
        given = 0
        for position, (number, sample, data) in enumerate(samples):
            if position < skip:
                continue
            try:
                image = load_rgb_bytes(data)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                print(
                    f"warning: skipping unreadable image {sample.member} in {sample.shard}: {e}",
                    file=sys.stderr,
                )
                pending.append(number)
                if len(pending) >= MAX_DECODE_ATTEMPTS:
                    raise UserError(
                        f"no image could be decoded in {MAX_DECODE_ATTEMPTS} samples in a row "
                        f"(the last: {sample.member} in {sample.shard})"
                    ) from None
                continue
            label = self.number.get(sample.label, -1) if self.number else -1
            if self.number and label < 0:
                raise UserError(
                    f"{sample.shard}: {sample.member} has label {sample.label!r}, which the run's "
                    "count did not find (the shard changed): restore it, or start a new run"
                )
            for n in [*pending, number]:
                yield seeded_transform(self.transform, image, self.plan.seed, epoch, n), label
                given += 1
                if given == want:
                    return
            pending = []
        if given < want:
            raise UserError(
                f"the stream ended {want - given} sample(s) short of its batches (the last "
                f"{len(pending)} did not decode)"
            )


def load_rgb_bytes(data: bytes) -> Image.Image:
    return load_rgb(io.BytesIO(data))
