"""`TarSource`: tar shards (WebDataset's layout, img2dataset's output) as an `ImageSource`.

An item is a sample's image member, keyed `tar:<shard>//<member>` (`core.tars.item_key`);
its facts are the member's size and the shard's mtime, so a rerun skips every item of an
unchanged shard and embeds again those of a rewritten one. A local shard is listed by its
index (or its member headers) and each item handed to the decoders as a byte range of the
shard, which the decoder process reads itself. A `pipe:` shard has no offsets, size or
mtime: it is streamed (through WebDataset) on every run, and its members not already in the
index at the same size are embedded from their bytes.

What goes wrong while listing (a truncated tar, a member header past the end, a sample
without an image, a stale index, another sample count than shards.json's) is kept in
`failures`, for the index's failures table; the rest of the shard (a refused shard: none of
it), and every other shard, goes on.
"""

from __future__ import annotations

import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from mocoserve.core import tars
from mocoserve.core.decode import ByteRange
from mocoserve.core.errors import UserError
from mocoserve.core.streams import STALL_SECONDS
from mocoserve.ingest.scan import FoundFile, SourceItem
from mocoserve.ingest.timing import StageTime

# a streamed member the index already holds at this size: not embedded again
Unchanged = Callable[[str, int], bool]


class TarSource:
    """Tar shards named by paths, brace patterns, folders of shards, shards.json or pipe:."""

    def __init__(
        self,
        specs: Sequence[str | Path],
        label_key: str | None = None,
        labels: bool = True,
        stall_s: float = STALL_SECONDS,
    ) -> None:
        self.specs = [str(s) for s in specs]
        self.shards = tars.expand(self.specs)  # a missing shard: a UserError, before any work
        self.nsamples = tars.listed_counts(self.specs)  # a shards.json's count per shard
        self.label_key = label_key
        self.stall_s = stall_s  # a pipe: read waiting this long stops its command
        self.labels = labels
        self.time = StageTime()
        self.failures: list[tuple[str, str]] = []  # (key, reason), from listing and streaming
        self.unchanged: Unchanged | None = None  # set by the caller, for pipe: shards
        self.streamed = 0  # pipe: members read this run
        self._ranges: dict[str, ByteRange] = {}
        self._streams: list[str] = []

    @property
    def roots(self) -> list[str]:
        """Each local shard's key, and each folder of shards named (a shard gone from it, or a
        member gone from a shard, is removed); pipe: shards cover nothing (never removed)."""
        roots = [tars.shard_key(s) for s in self.shards if not s.startswith(tars.PIPE)]
        for spec in self.specs:
            p = Path(spec)
            folder = p if p.is_dir() else p.parent if p.name == tars.SHARD_LIST else None
            if folder is not None and not spec.startswith(tars.PIPE):
                roots.append(tars.shard_key(str(folder.resolve())))
        return roots

    def scan(self, keep: Callable[[str], bool] | None = None) -> list[FoundFile]:
        """Every sample of the local shards this process keeps (`keep(shard key)`: whole
        shards), listed by index or headers; pipe: shards are noted, to stream in `read`."""
        started = time.perf_counter()
        found: dict[str, FoundFile] = {}
        self.failures, self._ranges, self._streams = [], {}, []
        for shard in self.shards:
            if keep is not None and not keep(tars.shard_key(shard)):
                continue
            if shard.startswith(tars.PIPE):
                self._streams.append(shard)
                continue
            listing = self._list(shard)
            for sample in listing.samples:
                key = tars.item_key(shard, sample.member)
                label = sample.label if self.labels else None
                found[key] = FoundFile(key, label, sample.size, listing.mtime)
                self._ranges[key] = ByteRange(
                    shard, sample.offset, sample.size, listing.mtime, sample.member
                )
        self.time.add(started, len(found))
        return list(found.values())

    def _list(self, shard: str) -> tars.ShardListing:
        try:
            listing = tars.list_shard(shard, self.label_key, nsamples=self.nsamples.get(shard))
        except (UserError, OSError) as e:  # a stale index or count, an unreadable file
            self.failures.append((tars.shard_key(shard), str(e)))
            return tars.ShardListing(shard, -1, 0)
        for where, reason in listing.failures:
            key = tars.shard_key(shard) if where == shard else tars.item_key(shard, where)
            self.failures.append((key, reason))
        return listing

    def read(self, found: Iterable[FoundFile]) -> Iterator[SourceItem]:
        """The listed items as byte ranges of their shards, then the pipe: shards' members
        (those not unchanged) with their bytes."""
        for f in found:
            yield SourceItem(f.path, self._ranges[f.path], f)
        for url in self._streams:
            yield from self._stream(url)

    def _stream(self, url: str) -> Iterator[SourceItem]:
        started = time.perf_counter()
        try:
            for sample, data in tars.stream_samples(url, self.label_key, self.stall_s):
                key = tars.item_key(url, sample.member)
                self.streamed += 1
                if self.unchanged is not None and self.unchanged(key, len(data)):
                    continue
                label = sample.label if self.labels else None
                self.time.add(started, 1)
                yield SourceItem(key, data, FoundFile(key, label, len(data), 0))
                started = time.perf_counter()
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.failures.append((tars.shard_key(url), f"stream failed: {reason}"))
