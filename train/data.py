"""Image folders for training: scanning, decoding, per-sample seeded augmentation, sharding."""

from __future__ import annotations

import hashlib
import random
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from mocoserve.core.errors import UserError
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


MAX_DECODE_ATTEMPTS = 32  # files tried in a row for one item before the folder is refused


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class ImageDataset(Dataset):
    """Decodes one image and applies `transform` under a seed of (seed, epoch, index).

    Items are `(index, epoch)` pairs (see EpochSampler), so an image's augmentation does not
    depend on the worker count, on persistent workers or on where a resumed run restarts.
    An unreadable file is reported once (per worker) and replaced by the next readable one;
    32 unreadable files in a row stop the run with a UserError.
    """

    def __init__(
        self, files: Sequence[Path], labels: Sequence[int], transform: Callable, seed: int = 0
    ) -> None:
        self.files = list(files)
        self.labels = list(labels)
        self.transform = transform
        self.seed = seed
        self._bad: set[int] = set()  # files this worker found unreadable: skipped, not retried

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
                image = load_rgb(self.files[i])
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                self._bad.add(i)
                skipped.append(f"{self.files[i]}: {e}")
                continue
            for reason in skipped:
                print(f"warning: skipping unreadable image {reason}", file=sys.stderr)
            seed = _sample_seed(self.seed, epoch, index)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                return self.transform(image), self.labels[i]
        raise UserError(
            f"no image could be decoded in {min(n, MAX_DECODE_ATTEMPTS)} tries in a row"
            + (f" (the last: {skipped[-1]})" if skipped else "")
            + "; is this a folder of images?"
        )


class EpochSampler(Sampler):
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
        self.epoch = 0
        self.skip_batches = 0
        self.saved_layout: dict[str, int] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip_batches = skip_batches

    def state_dict(self) -> dict[str, int]:
        """The layout a saved mid-epoch position counts its batches in."""
        return {"seed": self.seed, "n": self.n, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.saved_layout = {k: int(v) for k, v in state.items()}

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
        skip = min(samples // self.global_batch, self.batches_per_epoch)
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
    sampler: Sampler,
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
