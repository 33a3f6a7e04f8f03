"""images/s of `mocoserve embed` against the model alone and a plain PyTorch loop.

One run, one folder of JPEGs, one model (a fresh MoCo v2 ResNet at 224 px):
  bound  the exported model alone (ONNX Runtime) on pre-decoded, pre-cropped tensors;
  embed  `embed_folders` into a new index: read, hash, decode, crop, embed, SQLite, FAISS;
  plain  what a user would write: torchvision ImageFolder + DataLoader + the eager model;
  sharded  `torchrun --nproc_per_node P -m mocoserve embed` (P processes, one shard each, rank 0
         builds), timed as a whole from the command line, against one process the same way.
Usage: python benchmarks/embed_throughput.py [--images 1000] [--arch resnet18] [--workers N]
       [--procs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.export_throughput import make_package
from mocoserve import model as package_loader
from mocoserve.core.decode import decode_file, default_workers
from mocoserve.export.package import embedding_model
from mocoserve.train import checkpoint


def make_jpegs(root: Path, n: int, seed: int = 0) -> Path:
    """n photo-sized (500 x 375) JPEGs with smooth structure and noise, in 4 class folders."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(n):
        folder = root / f"class_{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        f = rng.uniform(0.005, 0.05, size=3)
        img = np.stack(
            [
                127 + 100 * np.sin(xx * f[c] + yy * f[(c + 1) % 3] + rng.uniform(0, 6))
                for c in range(3)
            ],
            axis=-1,
        )
        img += rng.normal(0, 12, size=img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            folder / f"img_{i:05d}.jpg", quality=90
        )
    return root


def bound(pkg: Path, files: list[Path], batch: int) -> float:
    """The model alone: pre-decoded tensors, batch after batch."""
    encoder = package_loader.load(pkg, backend="onnx", device="cpu")
    pixels = [decode_file(str(p), encoder.resize, encoder.input_size).pixels for p in files]
    batches = [
        package_loader.to_input(np.stack(pixels[i : i + batch]))
        for i in range(0, len(pixels), batch)
    ]
    encoder.embed(batches[0])  # warm-up
    start = time.perf_counter()
    for b in batches:
        encoder.embed(b)
    return len(files) / (time.perf_counter() - start)


def embed_in_fresh_process(root: Path, pkg: Path, index: Path, args: argparse.Namespace) -> float:
    """`embed_folders` timed in a new interpreter, as `mocoserve embed` runs (no torch loaded).

    The whole call is timed: model load, folder scan, decoding, embedding, SQLite, FAISS.
    """
    code = (
        "import sys, time\n"
        "from mocoserve.ingest.embed import embed_folders\n"
        "t = time.perf_counter()\n"
        f"s = embed_folders([{str(root)!r}], {str(pkg)!r}, {str(index)!r}, "
        f"batch_size={args.batch}, workers={args.workers})\n"
        "print(s.embedded / (time.perf_counter() - t))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def cli_seconds(cmd: list[str]) -> float:
    """Wall-clock seconds of a command that must succeed."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def sharded(root: Path, pkg: Path, tmp: Path, args: argparse.Namespace) -> dict[str, float]:
    """img/s of the whole command: one process, then torchrun with --procs processes."""
    n = len(list(root.rglob("*.jpg")))
    embed = ["embed", str(root), "--model", str(pkg), "--quiet", "--batch-size", str(args.batch)]
    per_proc = max(1, args.workers // args.procs)
    one = cli_seconds(
        [sys.executable, "-m", "mocoserve", *embed, "--index", str(tmp / "one.faiss")]
        + ["--workers", str(args.workers)]
    )
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    many = cli_seconds(
        [torchrun, "--standalone", "--nproc_per_node", str(args.procs), "-m", "mocoserve"]
        + [*embed, "--index", str(tmp / "many.faiss"), "--workers", str(per_proc)]
    )
    return {"one_process_img_s": n / one, f"torchrun_{args.procs}_img_s": n / many}


def plain_loop(ckpt: Path, root: Path, batch: int, workers: int, resize: int, crop: int) -> float:
    """torchvision ImageFolder + DataLoader + eager model, as a user would write it."""
    from torchvision import datasets, transforms

    model, _ = embedding_model(checkpoint.load(ckpt), "backbone")
    model.eval()
    tf = transforms.Compose(
        [transforms.Resize(resize), transforms.CenterCrop(crop), transforms.ToTensor()]
    )
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(root), tf), batch_size=batch, num_workers=workers
    )
    n, start = 0, time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
            n += len(x)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--procs", type=int, default=2, help="torchrun processes (sharded run)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_jpegs(tmp / "images", args.images)
        files = sorted(root.rglob("*.jpg"))
        ckpt, pkg = make_package(args.arch, tmp)
        manifest = package_loader.read_manifest(pkg)
        r = {
            "images": len(files),
            "arch": args.arch,
            "input_size": manifest.input_size,
            "workers": args.workers,
            "cpu_count": os.cpu_count(),
        }
        r["bound_img_s"] = bound(pkg, files, args.batch)
        r["embed_img_s"] = embed_in_fresh_process(root, pkg, tmp / "out.faiss", args)
        r["plain_pytorch_img_s"] = plain_loop(
            ckpt,
            root,
            args.batch,
            args.workers,
            manifest.preprocess.resize,
            manifest.input_size,
        )
        r["embed_vs_bound"] = r["embed_img_s"] / r["bound_img_s"]
        r["embed_vs_plain"] = r["embed_img_s"] / r["plain_pytorch_img_s"]
        r |= sharded(root, pkg, tmp, args)
        r["sharded_vs_one"] = r[f"torchrun_{args.procs}_img_s"] / r["one_process_img_s"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
