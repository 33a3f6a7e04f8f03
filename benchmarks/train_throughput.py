"""Training throughput of `mocoserve train`, measured in one run.

Prints images/s for MoCo on one device:
  - model only: synthetic tensors already on the device (the bound the data pipeline chases),
    eager and, with --compile, torch.compile'd encoders;
  - end to end: `mocoserve train` on a folder of generated JPEGs (decode + augment + train),
and the ratios between them. Usage (GPU): python benchmarks/train_throughput.py --compile
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mocoserve.train.config import TrainConfig
from mocoserve.train.configure import build_config
from mocoserve.train.methods import build_method
from mocoserve.train.trainer import fit


def _write_jpeg(args: tuple[Path, int, int]) -> None:
    path, i, size = args
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 255, 3)
    img = (
        base
        * (0.5 + 0.5 * np.sin(6.28 * (xx * rng.uniform(1, 5) + yy * rng.uniform(1, 5))))[..., None]
    )
    img = img + rng.normal(0, 12, (size, size, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_folder(root: Path, n: int, size: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_jpeg, [(root / f"{i:06d}.jpg", i, size) for i in range(n)], chunksize=64)
    return root


def on_device(cfg: TrainConfig, compile_model: bool) -> tuple[torch.device, torch.nn.Module]:
    """The method `cfg` configures, on the GPU where there is one (channels-last there, as the
    Trainer does), its `compile_targets` torch.compile'd if asked."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    method = build_method(cfg).to(device)
    if device.type == "cuda":  # a ViT only restrides its patch conv
        method.to(memory_format=torch.channels_last)
    if compile_model:
        for name in method.compile_targets:
            getattr(method, name).compile()
    return device, method


def steps_per_s(
    method: torch.nn.Module,
    opt: torch.optim.Optimizer,
    views: list[torch.Tensor],
    args: argparse.Namespace,
) -> float:
    """Training images/s of --steps optimiser steps on the synthetic `views`, after --warmup."""
    device = views[0].device
    labels = torch.zeros(args.batch_size, dtype=torch.long, device=device)
    half = torch.float16 if args.precision == "fp16" else torch.bfloat16
    amp = device.type == "cuda" and args.precision != "fp32"

    def step() -> None:
        with torch.autocast(device.type, dtype=half, enabled=amp):
            loss = method(views, labels)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def add_step_args(
    p: argparse.ArgumentParser,
    batch_size: int,
    steps: int,
    warmup: int,
    precision_help: str | None = None,
) -> None:
    """--batch-size, --steps, --warmup and --precision, which steps_per_s reads."""
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--precision", default="bf16", help=precision_help)


def model_only(args: argparse.Namespace, compile_model: bool) -> float:
    cfg = build_config(
        "moco-v2",
        overrides={
            "model.arch": args.arch,
            "optim.batch_size": args.batch_size,
            "run.precision": args.precision,
        },
    )
    device, method = on_device(cfg, compile_model)
    opt = torch.optim.SGD(
        [p for p in method.parameters() if p.requires_grad], lr=0.03, momentum=0.9
    )
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    views = [
        torch.randn(args.batch_size, 3, 224, 224, device=device).to(memory_format=fmt)
        for _ in range(2)
    ]
    return steps_per_s(method, opt, views, args)


def end_to_end(
    args: argparse.Namespace, folder: Path, compile_model: bool, gpu_augment: bool = False
) -> float:
    out = Path(tempfile.mkdtemp(prefix="bench-train-"))
    cfg = build_config(
        "moco-v2",
        overrides={
            "data.root": str(folder),
            "data.workers": args.workers,
            "data.gpu_augment": gpu_augment,
            "model.arch": args.arch,
            "optim.batch_size": args.batch_size,
            "optim.epochs": 1000,
            "run.out": str(out),
            "run.precision": args.precision,
            "run.compile": compile_model,
            "run.max_steps": args.warmup + args.steps,
            "run.log_every": args.warmup,
            "run.progress": False,
        },
    )
    fit(cfg)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "images_per_s" in r and r["step"] > args.warmup]
    # mean over the windows after warm-up, weighted by steps (log_every steps each)
    return float(np.mean([r["images_per_s"] for r in windows]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", default="resnet50")
    add_step_args(p, batch_size=256, steps=100, warmup=20)
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--image-px", type=int, default=256)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    p.add_argument("--skip-end-to-end", action="store_true")
    p.add_argument("--gpu-augment", action="store_true", help="also end to end with --gpu-augment")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results: dict[str, object] = {
        "device": device,
        "torch": torch.__version__,
        "arch": args.arch,
        "batch_size": args.batch_size,
        "precision": args.precision if torch.cuda.is_available() else "fp32",
    }
    results["model_only_eager"] = model_only(args, compile_model=False)
    print(f"model only, eager:     {results['model_only_eager']:8.0f} img/s", flush=True)
    if args.compile:
        results["model_only_compiled"] = model_only(args, compile_model=True)
        print(f"model only, compiled:  {results['model_only_compiled']:8.0f} img/s", flush=True)
    if not args.skip_end_to_end:
        folder = make_folder(
            Path(tempfile.mkdtemp(prefix="bench-jpegs-")), args.images, args.image_px
        )
        results["end_to_end_eager"] = end_to_end(args, folder, compile_model=False)
        print(f"end to end, eager:     {results['end_to_end_eager']:8.0f} img/s", flush=True)
        if args.gpu_augment:
            results["end_to_end_gpu_augment"] = end_to_end(args, folder, False, gpu_augment=True)
            print(
                f"end to end, eager, --gpu-augment: {results['end_to_end_gpu_augment']:8.0f} img/s",
                flush=True,
            )
            ratio = results["end_to_end_gpu_augment"] / results["model_only_eager"]  # type: ignore[operator]
            print(f"end to end --gpu-augment / model only (eager): {ratio:.2f}")
        if args.compile:
            results["end_to_end_compiled"] = end_to_end(args, folder, compile_model=True)
            print(f"end to end, compiled:  {results['end_to_end_compiled']:8.0f} img/s", flush=True)
        results["workers"] = args.workers
        ratio = results["end_to_end_eager"] / results["model_only_eager"]  # type: ignore[operator]
        print(f"end to end / model only (eager): {ratio:.2f}")
    if args.compile:
        speedup = results["model_only_compiled"] / results["model_only_eager"]  # type: ignore[operator]
        print(f"compiled / eager (model only):   {speedup:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
