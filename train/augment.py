"""Augmentation recipes (torchvision.transforms.v2) of MoCo v1, MoCo v2 (aug+) and SupCon."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

from train.config import DataConfig


def _to_normalized_tensor(cfg: DataConfig) -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
    ]


class PILGaussianBlur(v2.Transform):
    """Gaussian blur with sigma drawn from `sigma` (MoCo v2's aug+), in PIL's C code.

    torchvision's GaussianBlur runs a 23x23 float convolution per 224 px view (about 11 ms
    on one core, more than the rest of the recipe together); PIL's takes well under 1 ms.
    The sigma comes from torch's RNG, so the per-sample seeding covers it.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        super().__init__()
        self.sigma = sigma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        lo, hi = self.sigma
        return {"sigma": float(torch.empty(1).uniform_(lo, hi))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, Image.Image):
            return inpt.filter(ImageFilter.GaussianBlur(radius=params["sigma"]))
        return v2.functional.gaussian_blur(
            inpt, _odd(int(4 * params["sigma"]) * 2 + 1), params["sigma"]
        )


def _odd(k: int) -> int:
    return k if k % 2 else k + 1


def train_transform(cfg: DataConfig) -> v2.Transform:
    """One random view of an RGB PIL image, per the config's recipe."""
    size = cfg.image_size
    crop = v2.RandomResizedCrop(size, scale=(cfg.min_crop_scale, 1.0), antialias=True)
    flip: list[v2.Transform] = [v2.RandomHorizontalFlip()] if cfg.hflip else []
    if cfg.augmentation == "moco-v1":
        ops: list[v2.Transform] = [
            crop,
            v2.RandomGrayscale(p=0.2),
            v2.ColorJitter(0.4, 0.4, 0.4, 0.4),
            *flip,
        ]
    elif cfg.augmentation in ("moco-v2", "supcon"):
        ops = [
            crop,
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        if cfg.blur:
            ops.append(v2.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5))
        ops.extend(flip)
    elif cfg.augmentation == "linear":
        ops = [v2.RandomResizedCrop(size, antialias=True), *flip]
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
