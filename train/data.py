"""Training data: image folders and tar shards (scanned to one index), decoding,
per-sample seeded augmentation, sharding over ranks.

A folder and the same images as tar shards (`mocoserve shards`) index to the same items in
the same order with the same label ids, so everything past the index (the sampler's
shuffle, the per-sample seeds, mid-epoch resume, the DDP split) is one code path and the two
forms train to the same weights.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from mocoserve.core import tars
from mocoserve.core.errors import UserError
from mocoserve.core.files import path_text
from mocoserve.core.images import IMAGE_EXTENSIONS, iter_image_files, load_rgb
from mocoserve.train import distributed


@dataclass
class FolderIndex:
    """The images of a folder: flat (unlabelled, label -1) or `class/image` (labelled)."""

    root: Path
    files: list[Path]
    labels: list[int]
    classes: list[str]

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def __len__(self) -> int:
        return len(self.files)


def scan_folder(root: str | Path, classes: Sequence[str] | None = None) -> FolderIndex:
    """List the images under `root`; subfolders of `root` are classes if every image is in one.

    `classes` (from a training folder) fixes the label numbering; a class it lacks is an error.
    """
    path = Path(root)
    if not path.exists():
        raise UserError(f"image folder not found: {path}")
    if not path.is_dir():
        raise UserError(f"not a folder: {path}")
    files = list(iter_image_files(path))
    if not files:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise UserError(f"no images in {path} (looked recursively for {exts})")
    top = [f.relative_to(path).parts for f in files]
    if any(len(parts) == 1 for parts in top):  # images directly under root: unlabelled
        return FolderIndex(path, files, [-1] * len(files), [])
    names = sorted({parts[0] for parts in top})
    if classes is not None:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise UserError(
                f"{path} has classes the training folder lacks: {', '.join(unknown[:5])}"
                + (" ..." if len(unknown) > 5 else "")
            )
        names = list(classes)
    number = {name: i for i, name in enumerate(names)}
    return FolderIndex(path, files, [number[parts[0]] for parts in top], names)


@dataclass(frozen=True)
class TarMember:
    """An image stored in a tar shard: `size` bytes at byte `offset` of `shard`."""

    shard: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{path_text(self.shard)} (the member at byte {self.offset})"


class ShardMembers(Sequence[TarMember]):
    """The images of a set of shards as three arrays (shard number, offset, size): a few
    bytes per image, and no Python object per image for the loader's workers to copy."""

    def __init__(
        self, shards: list[str], shard_of: np.ndarray, offsets: np.ndarray, sizes: np.ndarray
    ) -> None:
        self.shards = shards
        self.shard_of = shard_of
        self.offsets = offsets
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> TarMember:  # type: ignore[override]
        return TarMember(self.shards[self.shard_of[i]], int(self.offsets[i]), int(self.sizes[i]))


@dataclass
class ShardIndex:
    """The images of tar shards, with FolderIndex's interface: `files` are TarMembers.

    Items are the shards' samples in order: shards in the order the source names them
    (brace patterns expanded, a folder's shards.json), samples in tar order, which is the
    folder's scan order for shards `mocoserve shards` wrote. Labels are class names (as
    core.tars.list_shard finds them: the index, the json's label or --label-key field, else
    the cls part as text), numbered by sorted name as a folder's class subfolders are.
    """

    root: str
    files: ShardMembers
    labels: np.ndarray  # int64, -1 where unlabelled
    classes: list[str]
    unlabelled: int = 0  # samples without a label (then the whole set is unlabelled)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def __len__(self) -> int:
        return len(self.files)


LIST_THREADS = 8  # shards listed at once (index files, or member headers: I/O bound)


def scan_shards(
    spec: str, classes: Sequence[str] | None = None, label_key: str | None = None
) -> ShardIndex:
    """Index the samples of the tar shards `spec` names, from their index files (no tar is
    read) or, for shards without one (img2dataset's), from their member headers.

    `label_key`: the json field holding each sample's label (img2dataset's metadata). A
    listing problem (a truncated tar, a sample without an image) is one warning per shard and
    the rest is used; a missing shard, one whose index no longer matches it, or one that
    lists another number of samples than its shards.json records, is an error.
    """
    shards = tars.expand([spec])
    streamed = [s for s in shards if s.startswith(tars.PIPE)]
    if streamed:
        raise UserError(
            f"--val reads its shards by offset, and a pipe: stream has none ({streamed[0]}); "
            "copy the val shards to a local or network file system and give their paths"
        )
    counts = tars.listed_counts([spec])  # shards.json's nsamples: a listing must agree
    shard_of, offsets, sizes = [], [], []
    names: list[str | None] = []
    first_missing: tars.TarSample | None = None  # named by a --label-key error

    def listed(shard: str) -> tars.ShardListing:
        return tars.list_shard(shard, label_key, nsamples=counts.get(shard))

    with ThreadPoolExecutor(min(LIST_THREADS, len(shards))) as pool:
        # in order; each listing becomes three arrays and is let go (no object per image)
        for n, listing in enumerate(pool.map(listed, shards)):
            _warn_listing(listing)
            rows = listing.samples
            shard_of.append(np.full(len(rows), n, np.int32))
            offsets.append(np.fromiter((r.offset for r in rows), np.int64, len(rows)))
            sizes.append(np.fromiter((r.size for r in rows), np.int64, len(rows)))
            names.extend(r.label for r in rows)
            if first_missing is None:
                first_missing = next((r for r in rows if r.label is None), None)
    if not names:
        raise UserError(f"no images in the shards of {spec}")
    members = ShardMembers(
        shards, np.concatenate(shard_of), np.concatenate(offsets), np.concatenate(sizes)
    )
    return _labelled(spec, members, names, first_missing, classes, label_key)


def _warn_listing(listing: tars.ShardListing) -> None:
    if listing.failures:
        where, reason = listing.failures[0]
        more = f" (and {len(listing.failures) - 1} more)" if len(listing.failures) > 1 else ""
        print(
            f"warning: {path_text(listing.shard)}: skipping {where}: {reason}{more}",
            file=sys.stderr,
        )


def _labelled(
    spec: str,
    members: ShardMembers,
    names: list[str | None],
    first_missing: tars.TarSample | None,
    classes: Sequence[str] | None,
    label_key: str | None,
) -> ShardIndex:
    if first_missing is not None:  # as a folder with images outside class folders: unlabelled
        missing = sum(name is None for name in names)
        if label_key is not None:
            raise UserError(
                f"--label-key {label_key}: {missing} of {len(names)} samples of {spec} have no "
                f"json field {label_key!r} (the first: {first_missing.key} in "
                f"{path_text(first_missing.shard)})"
            )
        return ShardIndex(spec, members, np.full(len(names), -1, np.int64), [], missing)
    found = sorted(set(names))  # type: ignore[type-var]
    if classes is not None:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UserError(
                f"{spec} has classes the training data lacks: {', '.join(unknown[:5])}"
                + (" ..." if len(unknown) > 5 else "")
            )
        found = list(classes)
    number = {name: i for i, name in enumerate(found)}
    labels = np.fromiter((number[n] for n in names), np.int64, len(names))  # type: ignore[index]
    return ShardIndex(spec, members, labels, found)


DataIndex = FolderIndex | ShardIndex


def scan_data(
    source: str | Path, classes: Sequence[str] | None = None, label_key: str | None = None
) -> DataIndex:
    """A training source's index: tar shards (see core.tars.is_shard_spec, or a folder that
    holds .tar files and no images, as img2dataset's output) or an image folder."""
    if is_shards(source):
        return scan_shards(str(source), classes, label_key)
    if label_key is not None:
        raise UserError(f"--label-key reads labels from shards' json; {source} is a folder")
    return scan_folder(source, classes)


def is_shards(source: str | Path) -> bool:
    """Whether a training source is tar shards rather than an image folder."""
    return tars.is_shard_spec(source) or _tars_only(Path(source))


def _tars_only(path: Path) -> bool:
    try:
        has_tars = path.is_dir() and any(p.name.endswith(".tar") for p in path.iterdir())
    except OSError:
        return False
    return has_tars and next(iter_image_files(path), None) is None


class ShardReader:
    """Reads members' bytes with one cached descriptor per shard and os.pread (no seek: a
    descriptor inherited by a forked loader worker is never moved under another process)."""

    # hand-written, not wids.ShardListDataset: wids opens and scans each tar for its own
    # index; the shard index files already hold every offset, so an image is one pread

    MAX_OPEN = 64  # descriptors kept per process (a run may name 100k shards)

    def __init__(self) -> None:
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._pid = os.getpid()

    def read(self, member: TarMember) -> bytes:
        if self._pid != os.getpid():  # a forked worker: its parent's cache is not its own
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(member.shard)
        if fd is None:
            fd = os.open(member.shard, os.O_RDONLY)
            self._fds[member.shard] = fd
            if len(self._fds) > self.MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(member.shard)
        # with its header, checked: a shard rewritten at the same size is refused, not read
        return tars.pread_member(fd, member.shard, member.offset, member.size)

    def __getstate__(self) -> dict:  # spawned workers open their own descriptors
        return {}

    def __setstate__(self, _state: dict) -> None:
        self.__init__()


MAX_DECODE_ATTEMPTS = 32  # files tried in a row for one item before the folder is refused


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_transform(transform: Callable, image: Image.Image, seed: int, epoch: int, index: int):
    """`transform(image)` seeded by sample `index` of `epoch` (torch's and Python's random
    state; torch's restored after): the same views whichever process or resume draws them."""
    sample = _sample_seed(seed, epoch, index)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample)
        random.seed(sample)
        return transform(image)


class ImageDataset(Dataset):
    """Decodes one image and applies `transform` under a seed of (seed, epoch, index).

    Items are `(index, epoch)` pairs (see EpochSampler), so an image's augmentation does not
    depend on the worker count, on persistent workers or on where a resumed run restarts.
    An unreadable file is reported once (per worker) and replaced by the next readable one;
    32 unreadable files in a row stop the run with a UserError.
    """

    def __init__(
        self,
        files: Sequence[Path] | ShardMembers,
        labels: Sequence[int] | np.ndarray,
        transform: Callable,
        seed: int = 0,
    ) -> None:
        self.files = files if isinstance(files, ShardMembers) else list(files)
        self.labels = labels if isinstance(labels, np.ndarray) else list(labels)
        self.transform = transform
        self.seed = seed
        self._bad: set[int] = set()  # files this worker found unreadable: skipped, not retried
        self._reader = ShardReader()

    def _load(self, i: int) -> Image.Image:
        item = self.files[i]
        if isinstance(item, TarMember):
            return load_rgb(io.BytesIO(self._reader.read(item)))
        return load_rgb(item)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[object, int]:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        n = len(self.files)
        skipped: list[str] = []  # reported once a readable file follows (else the error says)
        for attempt in range(min(n, MAX_DECODE_ATTEMPTS)):
            i = (index + attempt) % n
            if i in self._bad:
                continue
            try:
                image = self._load(i)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                self._bad.add(i)
                skipped.append(f"{self.files[i]}: {e}")
                continue
            for reason in skipped:
                print(f"warning: skipping unreadable image {reason}", file=sys.stderr)
            views = seeded_transform(self.transform, image, self.seed, epoch, index)
            return views, int(self.labels[i])
        raise UserError(
            f"no image could be decoded in {min(n, MAX_DECODE_ATTEMPTS)} tries in a row"
            + (f" (the last: {skipped[-1]})" if skipped else "")
            + "; is this a folder of images?"
        )


class EpochPosition:
    """Where an epoch stands (its number and the batches done) and the layout a saved
    position counts its batches in: the folders' EpochSampler and streaming's StreamPlan."""

    batch_size: int
    world: int
    batches_per_epoch: int

    def _start_position(self) -> None:
        self.epoch = 0
        self.skip_batches = 0
        self.saved_layout: dict[str, int] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip_batches = skip_batches

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.saved_layout = {k: int(v) for k, v in state.items()}

    def batches_after(self, epoch_step: int, saved_global_batch: int) -> int:
        """Whole batches of this layout that `epoch_step` saved batches' samples cover."""
        samples = epoch_step * saved_global_batch
        return min(samples // self.global_batch, self.batches_per_epoch)


class EpochSampler(EpochPosition, Sampler):
    """Shuffles by (seed, epoch) identically on every rank, shards by rank, yields (index, epoch).

    Only whole global batches are used (drop_last), so every rank runs the same number of
    equal batches; `skip_batches` resumes an epoch part-way without decoding what was done.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True) -> None:
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.world = distributed.world_size()
        self.rank = distributed.rank()
        self.batches_per_epoch = n // (batch_size * self.world)
        self._start_position()

    def state_dict(self) -> dict[str, int]:
        """The layout a saved mid-epoch position counts its batches in."""
        return {"seed": self.seed, "n": self.n, "global_batch": self.global_batch}

    def resume_position(self, epoch_step: int) -> tuple[int, str | None]:
        """Batches of this layout that `epoch_step` saved batches cover, and a note if inexact.

        Same layout: the same number, and the epoch resumes exactly. Another global batch
        (a different number of processes): the epoch continues after the same samples,
        rounded down to a whole batch. Another dataset size or seed: a new order.
        """
        saved = self.saved_layout
        if saved is None or epoch_step == 0:
            return epoch_step, None
        note = None
        if (saved["n"], saved["seed"]) != (self.n, self.seed):
            note = "the folder or seed changed since the checkpoint: the epoch goes on reordered"
        samples = epoch_step * saved["global_batch"]
        skip = self.batches_after(epoch_step, saved["global_batch"])
        if saved["global_batch"] != self.global_batch:
            note = (
                f"the global batch changed ({saved['global_batch']} -> {self.global_batch}): "
                f"the epoch goes on after {skip * self.global_batch} of its {samples} samples done"
            )
        return skip, note

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        used = self.batches_per_epoch * self.batch_size * self.world
        mine = order[:used][self.rank :: self.world]
        for i in mine[self.skip_batches * self.batch_size :].tolist():
            yield i, self.epoch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip_batches) * self.batch_size


class ShardSampler(Sampler):
    """Every index once across ranks, in order, padded to equal shards (for evaluation)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.world = distributed.world_size()
        self.per_rank = -(-n // self.world)

    def __iter__(self) -> Iterator[int]:
        padded = list(range(self.n)) + [self.n - 1] * (self.per_rank * self.world - self.n)
        return iter(padded[distributed.rank() :: self.world])

    def __len__(self) -> int:
        return self.per_rank


def _ignore_preemption_signals(_worker_id: int) -> None:
    # the main process handles SIGTERM/SIGUSR1 and shuts the workers down itself
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def make_loader(
    dataset: Dataset,
    sampler: Sampler | None,
    batch_size: int,
    workers: int,
    pin_memory: bool,
    drop_last: bool,
    persistent: bool,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_ignore_preemption_signals if workers > 0 else None,
        # its own generator: creating an iterator must not draw from the global RNG, or a
        # resumed run would see different random numbers (augmentations are seeded per sample)
        generator=torch.Generator().manual_seed(0),
    )
