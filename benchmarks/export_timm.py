"""Inference images/s of timm model packages (ViT-S/16, ConvNeXt-T) at 224 px.

Each model goes the way a user's pretrained file does: random weights saved to a
.safetensors file -> `export --weights` (ONNX + TorchScript, parity-gated) -> `load` ->
`embed`. PyTorch eager runs the same function (preprocessing and L2 norm inside) on the same
batch; ratios are against eager. On a GPU, CUDA eager, TorchScript and ONNX Runtime too.
Usage: python benchmarks/export_timm.py [--models vit_small_patch16_224,convnext_tiny]
       [--batch 16] [--seconds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.export_throughput import images_per_s
from mocoserve import model as package_loader
from mocoserve.export.package import EmbeddingModel
from mocoserve.export.weights import export_weights


def make_package(name: str, root: Path) -> tuple[Path, EmbeddingModel, float]:
    """A random timm model saved to a file and exported; the eager reference; export seconds."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False).eval()
    weights = root / f"{name}.safetensors"
    save_file(net.state_dict(), str(weights))
    started = time.perf_counter()
    result = export_weights(weights, f"timm:{name}", root / name, fp16=torch.cuda.is_available())
    seconds = time.perf_counter() - started
    pre = result.manifest.preprocess
    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    backbone.load_state_dict(
        {k: v for k, v in net.state_dict().items() if k in backbone.state_dict()}
    )
    return result.out, EmbeddingModel(backbone, None, pre.mean, pre.std).eval(), seconds


def measure(name: str, args: argparse.Namespace, x: np.ndarray, root: Path) -> dict:
    """images/s of one model's package on every backend available here."""
    pkg, eager, export_s = make_package(name, root)
    r: dict = {"export_seconds": round(export_s, 1)}
    xt = torch.from_numpy(x)
    none = lambda: None  # noqa: E731
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
            r["onnxruntime_cuda_error"] = str(e)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="vit_small_patch16_224,convnext_tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-export-timm-"))
    x = np.random.default_rng(0).random((args.batch, 3, 224, 224), dtype=np.float32)
    cuda = torch.cuda.is_available()
    results: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
    }
    for name in args.models.split(","):
        r = measure(name, args, x, root)
        base = r["pytorch_eager_cpu"]
        print(f"{name}, batch {args.batch}, 224 px, {results['threads']} CPU threads "
              f"(export {r['export_seconds']} s):")  # fmt: skip
        for key, value in r.items():
            if isinstance(value, float) and key != "export_seconds":
                print(f"  {key:26s} {value:9.1f} img/s   x{value / base:.2f} vs eager CPU")
            elif key != "export_seconds":
                print(f"  {key}: {value}")
        results[name] = r
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
