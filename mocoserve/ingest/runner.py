"""The runner: a source's items through decode -> model -> writer, batch by batch.

After clip-retrieval's `clip_inference/runner.py`: the runner owns no work of its own, it
wires the stages (`mocoserve.ingest.stages`) and collects their counts and times. Every
batch is committed (durable) before the next is embedded, so a killed run loses at most
the batch in flight; a decode failure is committed with the batch it came in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from mocoserve.core.decode import Decoded
from mocoserve.core.manifest import ModelFacts
from mocoserve.index.items import NewItem
from mocoserve.index.writer import IndexWriter
from mocoserve.ingest.scan import SourceItem, listed_files
from mocoserve.ingest.stages import (
    DecodeStage,
    IngestCounts,
    ModelStage,
    Sink,
    WriterStage,
)
from mocoserve.model import PackageEncoder

ProgressFn = Callable[[int], None]


class Runner:
    """Decode, embed and write items in batches of `batch_size` decoded images."""

    def __init__(
        self,
        decode: DecodeStage,
        model: ModelStage,
        writer: WriterStage,
        batch_size: int,
        progress: ProgressFn | None = None,
    ) -> None:
        self.decode, self.model, self.writer = decode, model, writer
        self.batch_size = batch_size
        self.progress = progress

    @classmethod
    def for_encoder(
        cls,
        encoder: PackageEncoder,
        sink: Sink,
        batch_size: int,
        workers: int,
        progress: ProgressFn | None = None,
    ) -> Runner:
        """The stages for a model package: decoded at its resize and crop, committed to `sink`."""
        decode = DecodeStage(encoder.resize, encoder.input_size, workers, encoder.interpolation)
        return cls(decode, ModelStage(encoder), WriterStage(sink), batch_size, progress)

    def run(self, items: Iterable[SourceItem]) -> IngestCounts:
        """Every item once, taken as they come (a streamed source is never held whole); the
        counts, and each stage's time."""
        counts = IngestCounts(
            decode=self.decode.time, model=self.model.time, write=self.writer.time
        )
        ready: list[tuple[str | None, Decoded]] = []
        failed: list[tuple[str, str]] = []
        for item, decoded in self.decode(items):
            if decoded.error:
                failed.append((item.key, decoded.error))
            else:
                ready.append((item.facts.label, decoded))
            if len(ready) >= self.batch_size:
                self._flush(ready, failed, counts)
        self._flush(ready, failed, counts)
        return counts

    def _flush(
        self,
        ready: list[tuple[str | None, Decoded]],
        failed: list[tuple[str, str]],
        counts: IngestCounts,
    ) -> None:
        vectors = self.model([d for _, d in ready])
        added = [
            NewItem(d.path, label, d.sha256, d.bytes, d.mtime, d.width, d.height, v)
            for (label, d), v in zip(ready, vectors, strict=True)
        ]
        self.writer(added, failed)
        counts.embedded += len(added)
        counts.failed += len(failed)
        counts.failures.extend(failed)
        if self.progress is not None:
            self.progress(len(added) + len(failed))
        ready.clear()
        failed.clear()


def ingest(
    encoder: PackageEncoder,
    paths: Sequence[str],
    labels: Sequence[str | None],
    sink: Sink,
    batch_size: int,
    workers: int,
    progress: ProgressFn | None = None,
) -> IngestCounts:
    """Decode, embed and commit these files batch by batch; each batch durable before the next."""
    runner = Runner.for_encoder(encoder, sink, batch_size, workers, progress)
    return runner.run(listed_files(list(paths), list(labels)))


def add_files(
    index_path: str | Path,
    encoder: PackageEncoder,
    paths: Sequence[str | Path],
    labels: Sequence[str | None] | None = None,
    batch_size: int = 64,
    workers: int = 0,
) -> IngestCounts:
    """Embed these files into an index (replacing any with the same path) and build it."""
    absolute = [os.path.abspath(p) for p in paths]
    with IndexWriter(index_path) as writer:
        writer.prepare(ModelFacts.of_package(encoder.path))
        writer.own(range(writer.shard_count))
        counts = ingest(
            encoder,
            absolute,
            list(labels) if labels is not None else [None] * len(absolute),
            writer.commit,
            batch_size,
            workers,
        )
        writer.build()
    return counts
