"""Augmentation recipes (torchvision.transforms.v2) of MoCo v1, MoCo v2 (aug+) and SupCon."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from train.config import DataConfig


def _to_normalized_tensor(cfg: DataConfig) -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
    ]


def _blur_kernel(size: int) -> int:
    k = int(0.1 * size)  # 10% of the image side, as in SimCLR / MoCo v2
    return k + 1 if k % 2 == 0 else k


def train_transform(cfg: DataConfig) -> v2.Transform:
    """One random view of an RGB PIL image, per the config's recipe."""
    size = cfg.image_size
    crop = v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True)
    if cfg.augmentation == "moco-v1":
        ops: list[v2.Transform] = [
            crop,
            v2.RandomGrayscale(p=0.2),
            v2.ColorJitter(0.4, 0.4, 0.4, 0.4),
            v2.RandomHorizontalFlip(),
        ]
    elif cfg.augmentation in ("moco-v2", "supcon"):
        ops = [
            crop,
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        if cfg.blur and _blur_kernel(size) >= 3:
            ops.append(v2.RandomApply([v2.GaussianBlur(_blur_kernel(size), (0.1, 2.0))], p=0.5))
        ops.append(v2.RandomHorizontalFlip())
    elif cfg.augmentation == "linear":
        ops = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        raise ValueError(f"unknown augmentation {cfg.augmentation!r}")
    return v2.Compose(ops + _to_normalized_tensor(cfg))


def eval_transform(cfg: DataConfig) -> v2.Transform:
    """Deterministic: resize the shorter side, centre-crop, normalise (what export folds in)."""
    return v2.Compose(
        [
            v2.Resize(cfg.resolved_eval_resize(), antialias=True),
            v2.CenterCrop(cfg.image_size),
            *_to_normalized_tensor(cfg),
        ]
    )


class MultiView:
    """Apply a random transform `n` times to the same image (the two crops of MoCo/SupCon)."""

    def __init__(self, transform: v2.Transform, n: int) -> None:
        self.transform = transform
        self.n = n

    def __call__(self, image: object) -> list[torch.Tensor]:
        return [self.transform(image) for _ in range(self.n)]
