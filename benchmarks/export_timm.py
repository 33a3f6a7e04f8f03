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
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.export_throughput import run, time_backends
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
    times = time_backends(
        pkg, eager, x, args, eager_fp16=False, onnx_cuda_error_key="onnxruntime_cuda_error"
    )
    return {"export_seconds": round(export_s, 1), **times}


def main() -> None:
    run(
        __doc__,
        "--models",
        "vit_small_patch16_224,convnext_tiny",
        16,
        "bench-export-timm-",
        measure,
    )


if __name__ == "__main__":
    main()
