"""Training images/s of timm backbones against a torchvision ResNet-50, at the same batch.

Model only (synthetic 224 px views already on the device, as `train_throughput.py`'s first
figure): each (method, arch) pair is configured the way `mocoserve train` would configure it
(the method's registry defaults and backbone recipe, its optimiser), then timed over --steps
optimiser steps after --warmup. Default pairs: MoCo v2 on ResNet-50 and ViT-S/16, and MoCo v3
on both where the registry has it. Usage: python benchmarks/train_timm.py --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_throughput import add_step_args, on_device, steps_per_s
from mocoserve.train.methods import METHODS
from mocoserve.train.optim import build_optimizer
from mocoserve.train.trainer import prepare_config

VIT_S = "timm:vit_small_patch16_224"


def images_per_s(method: str, arch: str, args: argparse.Namespace) -> float:
    """Optimiser steps of `method` on `arch` at --batch-size, in training images per second."""
    overrides = {
        "model.arch": arch,
        "optim.batch_size": args.batch_size,
        "run.precision": args.precision,
    }
    if METHODS[method].cls.has_queue:
        overrides["method.queue_size"] = args.queue_size
    cfg, _ = prepare_config(method, None, None, overrides, None)
    device, model = on_device(cfg, args.compile)
    model.train()
    opt = build_optimizer(cfg.optim, model, 1e-4)
    views = [
        torch.randn(args.batch_size, 3, 224, 224, device=device) for _ in range(model.num_views)
    ]
    return steps_per_s(model, opt, views, args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_step_args(
        p, batch_size=32, steps=5, warmup=1, precision_help="CUDA only; the CPU trains in fp32"
    )
    p.add_argument("--queue-size", type=int, default=65536)
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    p.add_argument(
        "--pair",
        action="append",
        help="METHOD:ARCH to time (repeatable), e.g. moco-v2:resnet50 or "
        f"moco-v3:{VIT_S}; default: moco-v2 and moco-v3 on resnet50 and ViT-S/16",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()

    pairs = [tuple(x.split(":", 1)) for x in args.pair or []]
    if not pairs:
        methods = [m for m in ("moco-v2", "moco-v3") if m in METHODS]
        pairs = [(m, a) for m in methods for a in ("resnet50", VIT_S)]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results: dict[str, object] = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "precision": args.precision if torch.cuda.is_available() else "fp32",
        "compile": args.compile,
        "images_per_s": {},
    }
    print(f"{device}, batch {args.batch_size}, {torch.get_num_threads()} threads", flush=True)
    for method, arch in pairs:
        rate = images_per_s(method, arch, args)
        results["images_per_s"][f"{method} {arch}"] = rate  # type: ignore[index]
        print(f"{method:10s} {arch:28s} {rate:8.1f} img/s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
