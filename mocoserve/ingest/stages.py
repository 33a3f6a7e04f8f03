"""The stages of ingest after the reader: decode, model, writer; each keeps its own time.

After clip-retrieval's reader -> mapper -> writer: `DecodeStage` turns a source's items into
pixels (in worker processes, `mocoserve.core.decode`'s pool), `ModelStage` turns batches of
pixels into L2-normalised vectors, `WriterStage` commits them (and the failures) to the
index's shards. A `StageTime` per stage says where a run's time went.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np

from mocoserve.ann.factory import normalize
from mocoserve.core.decode import Decoded, decode_bytes, decode_files
from mocoserve.index.items import NewItem
from mocoserve.ingest.scan import SourceItem
from mocoserve.ingest.timing import StageTime
from mocoserve.model import PackageEncoder, to_input

Sink = Callable[[list[NewItem], list[tuple[str, str]]], None]


@dataclass
class IngestCounts:
    """What one pass of the pipeline did, and where its time went."""

    embedded: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    decode: StageTime = field(default_factory=StageTime)  # waiting for decoded images
    model: StageTime = field(default_factory=StageTime)
    write: StageTime = field(default_factory=StageTime)  # vectors fsynced, metadata committed

    @property
    def decode_wait_s(self) -> float:
        return self.decode.seconds

    @property
    def embed_s(self) -> float:
        return self.model.seconds

    @property
    def commit_s(self) -> float:
        return self.write.seconds


class DecodeStage:
    """Items -> (item, Decoded), in order; `time` counts the wait for each decoded image.

    Files and byte ranges of files (a tar member) are read, hashed and decoded by `workers`
    processes (0: in this process), each reading its own bytes; bytes a source hands over
    (a pipe: stream's member) are decoded in this process. Items are taken as they come: a
    streamed source is never held whole.
    """

    def __init__(
        self, resize: int, crop: int, workers: int, interpolation: str = "bilinear"
    ) -> None:
        self.resize, self.crop, self.workers = resize, crop, workers
        self.interpolation = interpolation  # the package's resize filter
        self.time = StageTime()

    def __call__(self, items: Iterable[SourceItem]) -> Iterator[tuple[SourceItem, Decoded]]:
        for in_memory, run in groupby(items, key=lambda item: isinstance(item.data, bytes)):
            if in_memory:
                yield from self._timed((item, self._decode_bytes(item)) for item in run)
            else:
                # names and offsets only (the bytes stay in the files), so held whole
                yield from self._timed(self._decode_files(list(run)))

    def _timed(
        self, pairs: Iterator[tuple[SourceItem, Decoded]]
    ) -> Iterator[tuple[SourceItem, Decoded]]:
        try:
            while True:
                started = time.perf_counter()
                pair = next(pairs, None)
                if pair is None:  # the end (the pool's processes joined) counts as a wait
                    self.time.seconds += time.perf_counter() - started
                    return
                self.time.add(started, 1)
                pair[1].path = pair[0].key
                yield pair
        finally:
            pairs.close()  # type: ignore[attr-defined]

    def _decode_files(self, items: list[SourceItem]) -> Iterator[tuple[SourceItem, Decoded]]:
        decoded = decode_files(
            [item.data for item in items],  # type: ignore[misc]
            self.resize,
            self.crop,
            self.workers,
            interpolation=self.interpolation,
        )
        try:
            for item in items:
                yield item, next(decoded)
            next(decoded, None)  # the pool's processes are joined
        finally:
            decoded.close()  # type: ignore[attr-defined]

    def _decode_bytes(self, item: SourceItem) -> Decoded:
        return decode_bytes(
            item.data,  # type: ignore[arg-type]
            self.resize,
            self.crop,
            item.key,
            item.facts.mtime,
            interpolation=self.interpolation,
        )


class ModelStage:
    """A batch of decoded images -> their L2-normalised vectors (N x dim float32), timed."""

    def __init__(self, encoder: PackageEncoder) -> None:
        self.encoder = encoder
        self.time = StageTime()

    def __call__(self, batch: Sequence[Decoded]) -> np.ndarray:
        started = time.perf_counter()
        if batch:
            pixels = np.stack([d.pixels for d in batch])  # type: ignore[misc]
            vectors = normalize(self.encoder.embed(to_input(pixels)))
        else:
            vectors = np.zeros((0, self.encoder.embedding_dim), dtype=np.float32)
        self.time.add(started, len(batch))
        return vectors


class WriterStage:
    """Batches of vectors and failures to the index (`IndexWriter.commit`: durable on return)."""

    def __init__(self, commit: Sink) -> None:
        self.commit = commit
        self.time = StageTime()

    def __call__(self, added: list[NewItem], failed: list[tuple[str, str]]) -> None:
        started = time.perf_counter()
        self.commit(added, failed)
        self.time.add(started, len(added) + len(failed))
