"""Generated image folders for tests: small, seeded, with classes that differ visibly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 30), (160, 40, 200)]


def class_image(cls: int, i: int, size: int = 40, seed: int = 0) -> Image.Image:
    """A noisy image whose colour and stripe direction depend on the class."""
    rng = np.random.default_rng(seed * 100_003 + cls * 1009 + i)
    base = np.array(PALETTE[cls % len(PALETTE)], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = np.sin((xx if cls % 2 else yy) * (0.5 + 0.2 * cls) + rng.uniform(0, 6.28))
    img = base[None, None, :] * (0.6 + 0.3 * stripes[..., None])
    img += rng.normal(0, 20, size=(size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_labelled(
    root: Path, classes: int = 3, per_class: int = 8, size: int = 40, seed: int = 0
) -> Path:
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = "png" if i % 2 else "jpg"
            class_image(c, i, size, seed).save(folder / f"img_{i:03d}.{ext}")
    return root


def make_flat(root: Path, n: int = 24, size: int = 40, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        class_image(i % 3, i, size, seed).save(root / f"img_{i:03d}.png")
    return root
