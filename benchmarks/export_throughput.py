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


def time_backends(
    pkg: Path, eager: torch.nn.Module, x: np.ndarray, args: argparse.Namespace, *,
    eager_fp16: bool = True, onnx_cuda_error_key: str = "onnxruntime_cuda_fp32_error",
) -> dict:  # fmt: skip
    """images/s of a package on every backend available here, and of its `eager` reference.

    On a GPU also CUDA eager (fp32, and fp16 autocast where `eager_fp16`), TorchScript and
    ONNX Runtime (fp32, fp16); an ONNX Runtime CUDA failure goes under `onnx_cuda_error_key`.
    """
    xt = torch.from_numpy(x)
    none = lambda: None  # noqa: E731
    r: dict = {}
    with torch.no_grad():
        r["pytorch_eager_cpu"] = images_per_s(lambda: eager(xt), args.batch, args.seconds, none)
    ts = package_loader.load(pkg, backend="torchscript", device="cpu")
    r["torchscript_cpu"] = images_per_s(lambda: ts.embed(x), args.batch, args.seconds, none)
    ort_cpu = package_loader.load(pkg, backend="onnx", device="cpu")
    r["onnxruntime_cpu"] = images_per_s(lambda: ort_cpu.embed(x), args.batch, args.seconds, none)
    if torch.cuda.is_available():
        sync = torch.cuda.synchronize
        gpu = eager.cuda()

        def eager_cuda() -> np.ndarray:  # numpy in and out, as the package backends' embed()
            return gpu(torch.from_numpy(x).cuda()).float().cpu().numpy()

        with torch.no_grad():
            r["pytorch_eager_cuda_fp32"] = images_per_s(eager_cuda, args.batch, args.seconds, sync)
            if eager_fp16:
                with torch.autocast("cuda", dtype=torch.float16):
                    r["pytorch_eager_cuda_fp16"] = images_per_s(
                        eager_cuda, args.batch, args.seconds, sync
                    )
        ts_gpu = package_loader.load(pkg, backend="torchscript", device="cuda")
        r["torchscript_cuda_fp32"] = images_per_s(
            lambda: ts_gpu.embed(x), args.batch, args.seconds, sync
        )
        try:
            for fp16 in (False, True):
                enc = package_loader.load(pkg, backend="onnx", device="cuda", fp16=fp16)
                key = f"onnxruntime_cuda_{'fp16' if fp16 else 'fp32'}"
                r[key] = images_per_s(lambda e=enc: e.embed(x), args.batch, args.seconds, sync)
        except Exception as e:  # report why, keep the other figures
            r[onnx_cuda_error_key] = str(e)
    return r


def measure(arch: str, args: argparse.Namespace, x: np.ndarray, root: Path) -> dict:
    """images/s of one architecture's package on every backend available here."""
    ckpt, pkg = make_package(arch, root)
    eager, _ = embedding_model(checkpoint.load(ckpt), "backbone")
    return time_backends(pkg, eager, x, args)


def run(
    doc: str | None,
    names: str,
    names_default: str,
    batch_default: int,
    tmp_prefix: str,
    measure: Callable[[str, argparse.Namespace, np.ndarray, Path], dict],
) -> None:
    """Parse the arguments, `measure` each of the comma-separated `names`, print, write JSON.

    `names` is the option that lists them (--archs, --models). An `export_seconds` in a
    measurement goes in its heading rather than among the rates.
    """
    p = argparse.ArgumentParser(description=doc)
    p.add_argument(names, default=names_default)
    p.add_argument("--batch", type=int, default=batch_default)
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix=tmp_prefix))
    x = np.random.default_rng(0).random((args.batch, 3, 224, 224), dtype=np.float32)
    cuda = torch.cuda.is_available()
    results: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
    }
    for name in getattr(args, names.lstrip("-")).split(","):
        r = measure(name, args, x, root)
        base = r["pytorch_eager_cpu"]
        export = f" (export {r['export_seconds']} s)" if "export_seconds" in r else ""
        print(f"{name}, batch {args.batch}, 224 px, {results['threads']} CPU threads{export}:")
        for key, value in r.items():
            if key == "export_seconds":
                continue
            if isinstance(value, float):
                print(f"  {key:26s} {value:9.1f} img/s   x{value / base:.2f} vs eager CPU")
            else:
                print(f"  {key}: {value}")
        results[name] = r
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def main() -> None:
    run(__doc__, "--archs", "resnet18,resnet50", 32, "bench-export-", measure)


if __name__ == "__main__":
    main()
