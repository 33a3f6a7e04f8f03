"""Augmentation recipes (torchvision.transforms.v2) of MoCo v1, v2 (aug+), v3 and SupCon.

Each recipe is one frozen `Recipe`; the CPU transform (`train_transform`) and the split
`--gpu-augment` path (`GeometricView` draws the parameters, `color_augment_batch` applies
them on the device) both read it, so the two paths cannot drift apart. A recipe may differ
per view (MoCo v3's asymmetric blur and solarisation, after BYOL): `Recipe.view(i)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

from mocoserve.core.errors import UserError

if TYPE_CHECKING:
    from mocoserve.train.config import DataConfig


@dataclass(frozen=True)
class Recipe:
    """One augmentation recipe after its paper: what is drawn, how strongly, how often.

    `jitter` holds ColorJitter's brightness, contrast, saturation and hue strengths (each
    factor is drawn from [1 - s, 1 + s], hue from [-h, h]). The crop's scale range is
    (data.min_crop_scale, 1) unless `crop_scale` fixes it. `per_view` holds, for view i, the
    fields that differ from the rest (entry i mod its length); empty: every view alike.
    """

    name: str
    jitter: tuple[float, float, float, float] | None = None
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    grayscale_first: bool = False  # MoCo v1 applies RandomGrayscale before ColorJitter
    blur_p: float = 0.0  # Gaussian blur (switched off by data.blur=false for tiny images)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    crop_scale: tuple[float, float] | None = None
    solarize_p: float = 0.0  # BYOL's solarisation (PIL's ImageOps.solarize, threshold 128)
    per_view: tuple[Mapping[str, Any], ...] = field(default=(), hash=False)

    def view(self, i: int) -> Recipe:
        """The recipe of view i (the same recipe unless it differs per view)."""
        if not self.per_view:
            return self
        return dataclasses.replace(self, per_view=(), **self.per_view[i % len(self.per_view)])

    @property
    def num_variants(self) -> int:
        """How many different views the recipe draws (view i is variant i mod this)."""
        return max(1, len(self.per_view))

    @property
    def has_colour(self) -> bool:
        """Whether anything runs after the crop and flip (what --gpu-augment moves to the GPU)."""
        views = [self.view(i) for i in range(self.num_variants)]
        return any(
            v.jitter is not None or v.grayscale_p > 0 or v.blur_p > 0 or v.solarize_p > 0
            for v in views
        )

    @property
    def gpu_ready(self) -> bool:
        """Whether --gpu-augment runs it: the same draws for every view and no solarisation."""
        return not self.per_view and self.solarize_p == 0


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        # He et al. 2020 (MoCo v1): crop, grayscale 0.2, ColorJitter(0.4, 0.4, 0.4, 0.4), flip
        Recipe("moco-v1", jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, grayscale_p=0.2,
               grayscale_first=True),
        # Chen et al. 2020 (MoCo v2 "aug+"): jitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2,
        # Gaussian blur sigma in [0.1, 2] p=0.5, flip
        Recipe("moco-v2", jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2,
               blur_p=0.5),
        # Khosla et al. 2020 (SupContrast): the same colour distortion as MoCo v2
        Recipe("supcon", jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2,
               blur_p=0.5),
        # the linear-probe protocol: RandomResizedCrop (0.08, 1) and flip only
        Recipe("linear", crop_scale=(0.08, 1.0)),
        # Chen et al. 2021 (MoCo v3), BYOL's asymmetric recipe: jitter(0.4, 0.4, 0.2, 0.1)
        # p=0.8, grayscale 0.2; view 1 blur p=1.0, view 2 blur p=0.1 and solarise p=0.2; flip
        Recipe("moco-v3", jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2,
               blur_p=1.0, per_view=({"blur_p": 1.0}, {"blur_p": 0.1, "solarize_p": 0.2})),
    )
}  # fmt: skip


def recipe(name: str) -> Recipe:
    """The recipe called `name`; an unknown name is a UserError."""
    if name not in RECIPES:
        raise UserError(f"unknown augmentation {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


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


def _maybe(transform: v2.Transform, p: float) -> list[v2.Transform]:
    """The transform with probability p (always at 1, never at 0), as the recipes write it."""
    if p <= 0:
        return []
    return [transform] if p >= 1 else [v2.RandomApply([transform], p=p)]


def _crop(cfg: DataConfig, r: Recipe) -> v2.RandomResizedCrop:
    scale = r.crop_scale or (cfg.min_crop_scale, 1.0)
    return v2.RandomResizedCrop(cfg.image_size, scale=scale, antialias=True)


def train_transform(cfg: DataConfig, view: int = 0) -> v2.Transform:
    """One random view (view number `view`) of an RGB PIL image, per the config's recipe."""
    r = recipe(cfg.augmentation).view(view)
    jitter = _maybe(v2.ColorJitter(*r.jitter), r.jitter_p) if r.jitter else []
    gray = [v2.RandomGrayscale(p=r.grayscale_p)] if r.grayscale_p > 0 else []
    colour = [*gray, *jitter] if r.grayscale_first else [*jitter, *gray]
    blur = _maybe(PILGaussianBlur(r.blur_sigma), r.blur_p) if cfg.blur else []
    # on the PIL image, as the reference's ImageOps.solarize: pixels >= 128 inverted
    solarize = [v2.RandomSolarize(threshold=128, p=r.solarize_p)] if r.solarize_p > 0 else []
    flip: list[v2.Transform] = [v2.RandomHorizontalFlip()] if cfg.hflip else []
    return v2.Compose(
        [_crop(cfg, r), *colour, *blur, *solarize, *flip, *_to_normalized_tensor(cfg)]
    )


def train_views(cfg: DataConfig) -> list[v2.Transform]:
    """The recipe's view transforms: one, or one per variant (MoCo v3's two views)."""
    return [train_transform(cfg, i) for i in range(recipe(cfg.augmentation).num_variants)]


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
    """`n` random views of the same image (the two crops of MoCo/SupCon): view i by
    transform i mod len(transforms), one after another under the sample's seed."""

    def __init__(self, transforms: Any | Sequence[Any], n: int) -> None:
        self.transforms = (
            list(transforms) if isinstance(transforms, (list, tuple)) else [transforms]
        )
        self.n = n

    def __call__(self, image: object) -> list[Any]:
        return [self.transforms[i % len(self.transforms)](image) for i in range(self.n)]


# --- Split augmentation: geometry on the CPU workers, colour and blur batched on the device ---
# Parameter vector of one view, drawn on the CPU under the sample's seed (so runs stay
# deterministic and independent of the worker count): identity values where a transform
# was not drawn.
BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAY, SIGMA = range(6)


def draw_view_params(r: Recipe, blur: bool = True) -> torch.Tensor:
    """One view's colour/blur parameters, drawn with the recipe's probabilities and ranges."""
    p = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    if r.jitter is not None and torch.rand(()) < r.jitter_p:
        for i, strength in zip((BRIGHTNESS, CONTRAST, SATURATION), r.jitter[:3], strict=True):
            p[i] = float(torch.empty(()).uniform_(max(0.0, 1 - strength), 1 + strength))
        p[HUE] = float(torch.empty(()).uniform_(-r.jitter[3], r.jitter[3]))
    p[GRAY] = float(torch.rand(()) < r.grayscale_p)
    if r.blur_p > 0 and blur and torch.rand(()) < r.blur_p:
        p[SIGMA] = float(torch.empty(()).uniform_(*r.blur_sigma))
    return p


class GeometricView:
    """The CPU half: random resized crop and flip to a uint8 tensor, plus the colour params."""

    def __init__(self, cfg: DataConfig) -> None:
        self.recipe = recipe(cfg.augmentation)
        if not self.recipe.has_colour:
            raise ValueError(f"recipe {cfg.augmentation!r} has nothing to run on the GPU")
        self.blur = cfg.blur
        flip: list[v2.Transform] = [v2.RandomHorizontalFlip()] if cfg.hflip else []
        self.geometric = v2.Compose([_crop(cfg, self.recipe), *flip, v2.ToImage()])

    def __call__(self, image: object) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self.geometric(image).as_subclass(torch.Tensor)
        return pixels, draw_view_params(self.recipe, self.blur)


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


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per image (0: unchanged), reflect padding."""
    b, c, h, w = x.shape
    radius = int(3 * sigma_max + 0.999)
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
    images: torch.Tensor,
    params: torch.Tensor,
    mean: tuple,
    std: tuple,
    r: Recipe = RECIPES["moco-v2"],
) -> torch.Tensor:
    """The device half: uint8 B x 3 x H x W and B x 6 params -> normalised float views.

    ColorJitter's four adjustments in a fixed order (torchvision draws the order per image),
    each with torchvision's tensor formula; grayscale before or after them as the recipe
    says; then blur and normalisation.
    """
    x = images.float() / 255.0
    p = params.to(x.device, x.dtype)
    col = lambda i: p[:, i].view(-1, 1, 1, 1)  # noqa: E731

    def gray(x: torch.Tensor) -> torch.Tensor:
        return torch.where(col(GRAY) > 0, _gray(x).expand_as(x), x)

    if r.grayscale_first:
        x = gray(x)
    x = (x * col(BRIGHTNESS)).clamp(0, 1)
    m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (col(CONTRAST) * x + (1 - col(CONTRAST)) * m).clamp(0, 1)
    x = (col(SATURATION) * x + (1 - col(SATURATION)) * _gray(x)).clamp(0, 1)
    x = _adjust_hue(x, p[:, HUE])
    if not r.grayscale_first:
        x = gray(x)
    x = _gaussian_blur(x, p[:, SIGMA], r.blur_sigma[1])
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
