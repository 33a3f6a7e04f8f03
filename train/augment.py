"""Augmentation recipes (torchvision.transforms.v2) of MoCo v1, MoCo v2 (aug+) and SupCon."""

from __future__ import annotations

from typing import Any

import torch
from mocoserve.train.config import DataConfig
from PIL import Image, ImageFilter
from torchvision.transforms import v2


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


# --- Split augmentation: geometry on the CPU workers, colour and blur batched on the device ---
# Parameter vector of one view, drawn on the CPU under the sample's seed (so runs stay
# deterministic and independent of the worker count): identity values where a transform
# was not drawn.
BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAY, SIGMA = range(6)
BLUR_SIGMA_MAX = 2.0


def _draw_view_params(cfg: DataConfig) -> torch.Tensor:
    """One view's colour/blur parameters, as the recipe's probabilities and ranges say."""
    p = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    hue = 0.4 if cfg.augmentation == "moco-v1" else 0.1
    jitter_p = 1.0 if cfg.augmentation == "moco-v1" else 0.8
    if torch.rand(()) < jitter_p:
        p[BRIGHTNESS : SATURATION + 1] = torch.empty(3).uniform_(0.6, 1.4)
        p[HUE] = float(torch.empty(()).uniform_(-hue, hue))
    p[GRAY] = float(torch.rand(()) < 0.2)
    if cfg.augmentation != "moco-v1" and cfg.blur and torch.rand(()) < 0.5:
        p[SIGMA] = float(torch.empty(()).uniform_(0.1, BLUR_SIGMA_MAX))
    return p


class GeometricView:
    """The CPU half: random resized crop and flip to a uint8 tensor, plus the colour params."""

    def __init__(self, cfg: DataConfig) -> None:
        if cfg.augmentation not in ("moco-v1", "moco-v2", "supcon"):
            raise ValueError(f"no GPU augmentation for recipe {cfg.augmentation!r}")
        self.cfg = cfg
        ops: list[v2.Transform] = [
            v2.RandomResizedCrop(cfg.image_size, scale=(cfg.min_crop_scale, 1.0), antialias=True)
        ]
        if cfg.hflip:
            ops.append(v2.RandomHorizontalFlip())
        self.geometric = v2.Compose([*ops, v2.ToImage()])

    def __call__(self, image: object) -> tuple[torch.Tensor, torch.Tensor]:
        return self.geometric(image).as_subclass(torch.Tensor), _draw_view_params(self.cfg)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, as torchvision's rgb_to_grayscale: B x 3 x H x W -> B x 1 x H x W."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by its own shift (in turns), through HSV."""
    r, g, b = x.unbind(1)  # B x H x W each
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), maxc * 0)
    h = (h + shift.view(-1, 1, 1)) % 1.0
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    v = maxc
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6  # B x H x W, the sextant
    choices = torch.stack(
        [
            torch.stack([v, t, p], 1),
            torch.stack([q, v, p], 1),
            torch.stack([p, v, t], 1),
            torch.stack([p, q, v], 1),
            torch.stack([t, p, v], 1),
            torch.stack([v, p, q], 1),
        ]
    )  # 6 x B x 3 x H x W
    return choices.gather(0, i.unsqueeze(0).unsqueeze(2).expand(1, -1, 3, -1, -1)).squeeze(0)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per image (0: unchanged), reflect padding."""
    b, c, h, w = x.shape
    radius = int(3 * BLUR_SIGMA_MAX + 0.999)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # K
    s = sigma.to(x.dtype).clamp(min=1e-3).view(-1, 1)
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * s**2))  # B x K
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).to(x.dtype).expand_as(kernel)
    kernel = torch.where(sigma.view(-1, 1) > 0, kernel, identity)
    kernel = kernel.repeat_interleave(c, dim=0)  # (B*C) x K
    y = torch.nn.functional.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
    y = torch.nn.functional.conv2d(y, kernel.view(b * c, 1, -1, 1), groups=b * c)
    y = torch.nn.functional.conv2d(y, kernel.view(b * c, 1, 1, -1), groups=b * c)
    return y.view(b, c, h, w)


def color_augment_batch(
    images: torch.Tensor, params: torch.Tensor, mean: tuple, std: tuple
) -> torch.Tensor:
    """The device half: uint8 B x 3 x H x W and B x 6 params -> normalised float views.

    ColorJitter's four adjustments in a fixed order (torchvision draws the order per image),
    each with torchvision's tensor formula; then grayscale, blur and normalisation.
    """
    x = images.float() / 255.0
    p = params.to(x.device, x.dtype)
    col = lambda i: p[:, i].view(-1, 1, 1, 1)  # noqa: E731
    x = (x * col(BRIGHTNESS)).clamp(0, 1)
    m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (col(CONTRAST) * x + (1 - col(CONTRAST)) * m).clamp(0, 1)
    x = (col(SATURATION) * x + (1 - col(SATURATION)) * _gray(x)).clamp(0, 1)
    x = _adjust_hue(x, p[:, HUE])
    x = torch.where(col(GRAY) > 0, _gray(x).expand_as(x), x)
    x = _gaussian_blur(x, p[:, SIGMA])
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
