"""images/s reading one training epoch from tar shards against the same images as a folder.

The training reader of each form (train.data: scan_folder / scan_shards, ImageDataset, the
EpochSampler, the DataLoader), over the same JPEGs, in the same shuffled order:
  decode  bytes -> PIL RGB only (what the storage and the reader cost);
  train   the moco-v2 train transform, two views (what a training epoch's workers do).
Each is timed with a cold page cache (every image file and shard evicted first) and warm.
Eviction: posix_fadvise(POSIX_FADV_DONTNEED) on every file, which drops a file's clean pages
without privileges and without touching anyone else's cache (`fincore` shows 0 pages after);
with --drop-caches, `echo 3 > /proc/sys/vm/drop_caches` where the process may (root).
`shards-reopen` opens each shard per image (no descriptor cache). `shards-pipe` streams every
shard through `pipe:cat` (train.stream: what a run from an object store does, the shuffle
buffer included; its once-per-run counting pass is timed apart).
Usage: python benchmarks/read_shards.py [--images 4000] [--size 96] [--workers 2]
       [--shard-size 1000] [--dir DIR] [--drop-caches]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mocoserve.core import tars
from mocoserve.core.images import iter_image_files
from mocoserve.train import data, stream
from mocoserve.train.augment import MultiView, train_views
from mocoserve.train.config import DataConfig


def make_jpegs(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """n small JPEGs (size x size, smooth structure and noise) in 4 class folders."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n):
        folder = root / f"class_{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        f = rng.uniform(0.02, 0.2, size=3)
        img = np.stack([127 + 100 * np.sin(xx * f[c] + yy * f[(c + 1) % 3]) for c in range(3)], -1)
        img += rng.normal(0, 12, size=img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            folder / f"img_{i:06d}.jpg", quality=90
        )
    return root


def make_shards(folder: Path, out: Path, shard_size: int) -> Path:
    """`mocoserve shards`'s writer where it exists, else the same layout here (tar + index)."""
    try:
        from mocoserve.core.shardwriter import write_shards
    except ImportError:
        write_shards = None
    if write_shards is not None:
        write_shards(folder, out, shard_size=shard_size, labels_from_folders=True)
        return out
    out.mkdir(parents=True)
    files, counts = list(iter_image_files(folder)), []
    for start in range(0, len(files), shard_size):
        shard = out / f"shard-{start // shard_size:06d}.tar"
        with tarfile.open(shard, "w") as tar:
            for i, path in enumerate(files[start : start + shard_size], start):
                rel = path.relative_to(folder).as_posix()
                for name, payload in (
                    (f"{i:09d}.jpg", path.read_bytes()),
                    (
                        f"{i:09d}.json",
                        json.dumps({"path": rel, "label": rel.split("/")[0]}).encode(),
                    ),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        listing = tars.list_shard(str(shard))
        tars.write_index(shard, listing.samples)
        counts.append((str(shard), len(listing.samples)))
    tars.write_shard_list(out / tars.SHARD_LIST, counts)
    return out


def evict(paths: list[Path], drop_all: bool) -> str:
    """Empty the page cache of these files; the method that worked."""
    if drop_all:
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "echo 3 > /proc/sys/vm/drop_caches"
        except OSError:
            pass
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(POSIX_FADV_DONTNEED) on every file"


class ReopeningReader(data.ShardReader):
    """open, pread, close for every image: what the descriptor cache saves."""

    def read(self, member: data.TarMember) -> bytes:
        fd = os.open(member.shard, os.O_RDONLY)
        try:
            return os.pread(fd, member.size, member.offset)
        finally:
            os.close(fd)


def epoch(index: data.DataIndex, transform, workers: int, batch: int, reopen: bool) -> float:
    """images/s of one shuffled epoch through the training DataLoader."""
    dataset = data.ImageDataset(index.files, index.labels, transform, seed=0)
    if reopen:
        dataset._reader = ReopeningReader()
    sampler = data.EpochSampler(len(index), batch, seed=0)
    loader = data.make_loader(dataset, sampler, batch, workers, False, True, persistent=False)
    start = time.perf_counter()
    n = sum(len(labels) for _, labels in loader)
    return n / (time.perf_counter() - start)


def stream_epoch(index: stream.StreamIndex, transform, workers: int, batch: int) -> float:
    """images/s of one epoch streamed from pipe: commands (StreamPlan + StreamDataset)."""
    plan = stream.StreamPlan(index.counts, batch, seed=0, workers=workers, buffer=2000)
    dataset = stream.StreamDataset(index, plan, transform, stall_s=60)
    loader = data.make_loader(dataset, None, batch, plan.loader_workers, False, True, False)
    start = time.perf_counter()
    n = sum(len(labels) for _, labels in loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--drop-caches", action="store_true", help="evict the whole page cache")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = args.dir or Path(tempfile.mkdtemp(prefix="read_shards-"))
    folder, shards = base / "images", base / "shards"
    if not folder.is_dir():
        make_jpegs(folder, args.images, args.size)
    if not shards.is_dir():
        make_shards(folder, shards, args.shard_size)
    folder_index, shard_index = data.scan_folder(folder), data.scan_data(str(shards))
    assert len(folder_index) == len(shard_index)
    image_files = list(folder_index.files)
    tar_files = [Path(s) for s in shard_index.files.shards]
    cfg = DataConfig(image_size=min(64, args.size), blur=False)
    transforms = {"decode": lambda im: 0, "train": MultiView(train_views(cfg), 2)}
    kib = sum(p.stat().st_size for p in image_files) / len(image_files) / 1024
    print(
        f"{len(folder_index)} JPEGs of {args.size} px ({kib:.1f} KiB each), {len(tar_files)} "
        f"shards; {args.workers} workers, batch {args.batch}; in {base}"
    )
    for kind, transform in transforms.items():
        for form, index, files, reopen in (
            ("folder", folder_index, image_files, False),
            ("shards", shard_index, tar_files, False),
            ("shards-reopen", shard_index, tar_files, True),
        ):
            if reopen and kind == "train":
                continue
            method = evict(files, args.drop_caches)
            cold = epoch(index, transform, args.workers, args.batch, reopen)
            warm = epoch(index, transform, args.workers, args.batch, reopen)
            print(f"{kind:7s} {form:14s} cold {cold:8.0f} img/s   warm {warm:8.0f} img/s")
        evict(tar_files, args.drop_caches)
        began = time.perf_counter()
        urls = [f"pipe:cat {p}" for p in tar_files]
        streamed = stream.count_streams("bench", urls, "label", 60)
        counting = time.perf_counter() - began
        cold = stream_epoch(streamed, transform, args.workers, args.batch)
        warm = stream_epoch(streamed, transform, args.workers, args.batch)
        print(
            f"{kind:7s} {'shards-pipe':14s} cold {cold:8.0f} img/s   warm {warm:8.0f} img/s"
            f"   (counting pass, cold: {len(streamed) / counting:.0f} img/s)"
        )
    print(f"cache eviction: {method}")


if __name__ == "__main__":
    main()
