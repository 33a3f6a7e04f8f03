"""The stages of ingest after the reader: decode, model, writer; each keeps its own time.

After clip-retrieval's reader -> mapper -> writer: `DecodeStage` turns a source's items into
pixels (in worker processes, `mocoserve.core.decode`'s pool), `ModelStage` turns batches of
pixels into L2-normalised vectors, `WriterStage` commits them (and the failures) to the
index's shards. A `StageTime` per stage says where a run's time went.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from mocoserve.ann.factory import normalize
from mocoserve.core.decode import Decoded, decode_bytes, decode_file, decode_files
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

    Files are read, hashed and decoded by `workers` processes (0: in this process). Bytes a
    source hands over (a tar member) are decoded in this process for now: the pool takes
    paths only, and gains bytes with the tar reader (issue 22).
    """

    def __init__(self, resize: int, crop: int, workers: int) -> None:
        self.resize, self.crop, self.workers = resize, crop, workers
        self.time = StageTime()

    def __call__(self, items: Sequence[SourceItem]) -> Iterator[tuple[SourceItem, Decoded]]:
        decoded = self._decode(items)
        try:
            for item in items:
                started = time.perf_counter()
                one = next(decoded)
                self.time.add(started, 1)
                one.path = item.key
                yield item, one
            started = time.perf_counter()
            next(decoded, None)  # the end: the pool's processes are joined
            self.time.seconds += time.perf_counter() - started
        finally:
            decoded.close()

    def _decode(self, items: Sequence[SourceItem]) -> Iterator[Decoded]:
        if all(isinstance(item.data, str) for item in items):
            paths = [item.data for item in items]
            yield from decode_files(paths, self.resize, self.crop, self.workers)  # type: ignore[arg-type]
            return
        for item in items:
            if isinstance(item.data, str):
                yield decode_file(item.data, self.resize, self.crop)
            else:
                yield decode_bytes(item.data, self.resize, self.crop, item.key, item.facts.mtime)


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
