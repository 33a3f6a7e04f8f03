"""Inference images/s of a model package: ONNX Runtime vs PyTorch eager vs TorchScript.

All three run the same exported function (preprocessing and L2 norm inside) on the same
random batch, in one run; ratios are against PyTorch eager. On a GPU the CUDA provider,
CUDA TorchScript and CUDA eager (fp32, and fp16 autocast for eager) are measured too.
Usage: python benchmarks/export_throughput.py [--archs resnet18,resnet50] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mocoserve import model as package_loader
from mocoserve.export.package import embedding_model, export_checkpoint
from mocoserve.train import checkpoint
from mocoserve.train.configure import build_config
from mocoserve.train.methods import build_method


def images_per_s(fn: Callable[[], object], batch: int, seconds: float, sync: Callable) -> float:
    for _ in range(3):
        fn()
    sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    sync()
    return n * batch / (time.perf_counter() - start)


def make_package(arch: str, root: Path) -> tuple[Path, Path]:
    cfg = build_config("moco-v2", overrides={"model.arch": arch, "method.queue_size": 8})
    ckpt = root / f"{arch}.pt"
    checkpoint.save_atomic(checkpoint.model_state("moco-v2", cfg, build_method(cfg)), ckpt)
    return ckpt, export_checkpoint(ckpt, root / arch, fp16=torch.cuda.is_available()).out


def measure(arch: str, args: argparse.Namespace, x: np.ndarray, root: Path) -> dict:
    """images/s of one architecture's package on every backend available here."""
    cuda = torch.cuda.is_available()
    ckpt, pkg = make_package(arch, root)
    eager, _ = embedding_model(checkpoint.load(ckpt), "backbone")
    xt = torch.from_numpy(x)
    r: dict = {}
    with torch.no_grad():
        r["pytorch_eager_cpu"] = images_per_s(
            lambda: eager(xt), args.batch, args.seconds, lambda: None
        )
        ts = package_loader.load(pkg, backend="torchscript", device="cpu")
        r["torchscript_cpu"] = images_per_s(
            lambda: ts.embed(x), args.batch, args.seconds, lambda: None
        )
    onnx_cpu = package_loader.load(pkg, backend="onnx", device="cpu")
    r["onnxruntime_cpu"] = images_per_s(
        lambda: onnx_cpu.embed(x), args.batch, args.seconds, lambda: None
    )
    if cuda:
        sync = torch.cuda.synchronize
        eager_gpu = eager.cuda()

        def eager_cuda() -> np.ndarray:  # numpy in and out, as the package backends' embed()
            return eager_gpu(torch.from_numpy(x).cuda()).float().cpu().numpy()

        with torch.no_grad():
            r["pytorch_eager_cuda_fp32"] = images_per_s(eager_cuda, args.batch, args.seconds, sync)
            with torch.autocast("cuda", dtype=torch.float16):
                r["pytorch_eager_cuda_fp16"] = images_per_s(
                    eager_cuda, args.batch, args.seconds, sync
                )
        ts_gpu = package_loader.load(pkg, backend="torchscript", device="cuda")
        r["torchscript_cuda_fp32"] = images_per_s(
            lambda: ts_gpu.embed(x), args.batch, args.seconds, sync
        )
        try:
            onnx_gpu = package_loader.load(pkg, backend="onnx", device="cuda")
            r["onnxruntime_cuda_fp32"] = images_per_s(
                lambda: onnx_gpu.embed(x), args.batch, args.seconds, sync
            )
            onnx_gpu16 = package_loader.load(pkg, backend="onnx", device="cuda", fp16=True)
            r["onnxruntime_cuda_fp16"] = images_per_s(
                lambda: onnx_gpu16.embed(x), args.batch, args.seconds, sync
            )
        except Exception as e:  # report why, keep the other figures
            r["onnxruntime_cuda_fp32_error"] = str(e)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--archs", default="resnet18,resnet50")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-export-"))
    x = np.random.default_rng(0).random((args.batch, 3, 224, 224), dtype=np.float32)
    cuda = torch.cuda.is_available()
    results: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
    }
    for arch in args.archs.split(","):
        r = measure(arch, args, x, root)
        base = r["pytorch_eager_cpu"]
        print(f"{arch}, batch {args.batch}, 224 px, {results['threads']} CPU threads:")
        for key, value in r.items():
            if isinstance(value, float):
                print(f"  {key:26s} {value:9.1f} img/s   x{value / base:.2f} vs eager CPU")
            else:
                print(f"  {key}: {value}")
        results[arch] = r
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
