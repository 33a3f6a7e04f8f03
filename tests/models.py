"""Real checkpoints and model packages of tiny, freshly initialised models, for tests."""

from __future__ import annotations

from pathlib import Path

import torch

from mocoserve.train import checkpoint
from mocoserve.train.configure import build_config
from mocoserve.train.methods import build_method


def make_checkpoint(path: Path, method: str = "moco-v2", arch: str = "resnet18", **model) -> Path:
    """A real checkpoint file of a freshly initialised method (what fit() would write at step 0)."""
    cfg = build_config(
        method,
        overrides={
            "model.arch": arch,
            "model.dim": 16,
            "data.image_size": 32,
            "method.queue_size": 8 if method != "supcon" else 0,
            **{f"model.{k}": v for k, v in model.items()},
        },
    )
    torch.manual_seed(0)
    method_module = build_method(cfg)
    # a little BN state, so folding BatchNorm has something to fold
    method_module.train()
    with torch.no_grad():
        method_module.query_encoder(torch.rand(8, 3, 32, 32))
    checkpoint.save_atomic(
        checkpoint.model_state(method, cfg, method_module, epoch=1, step=3), path
    )
    return path


def make_package(root: Path, formats: tuple[str, ...] = ("onnx",)) -> Path:
    """A model package (ResNet-18, 32 px, 512-d backbone output) exported from a checkpoint."""
    from mocoserve.export.package import export_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(root / "model.pt")
    return export_checkpoint(ckpt, root / "model", formats=formats).out
