"""The preprocessing a pretrained weights file expects: from timm, torchvision, or the options.

Sources, the first that applies: timm's pretrained config of the model
(`timm.data.resolve_model_data_config`); the torchvision weights entry the file is (by the
name or hash in its download url, or `--weights-name`; nothing is downloaded); ImageNet
defaults. Options given explicitly win over each. Serving applies what is recorded in the
manifest's `preprocess`: resize the shorter side (bilinear or bicubic), centre-crop, scale.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mocoserve.core.errors import UserError
from mocoserve.core.manifest import INTERPOLATIONS, MAX_RESIZE, Preprocess
from mocoserve.train.config import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_SIZE, DEFAULT_RESIZE = 224, 256  # torchvision's classic ImageNet evaluation


@dataclass(frozen=True)
class PreprocessOptions:
    """What the user set explicitly (None: from the weights)."""

    input_size: int | None = None
    resize: int | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Chosen:
    """The preprocessing chosen for a package, and where it came from (for the user)."""

    input_size: int
    resize: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    origin: str

    def record(self) -> Preprocess:
        return Preprocess(
            resize=self.resize,
            crop=self.input_size,
            interpolation=self.interpolation,
            mean=list(self.mean),
            std=list(self.std),
        )

    def line(self) -> str:
        """One line for the user: what is applied and why."""
        triple = lambda v: ",".join(f"{x:g}" for x in v)  # noqa: E731
        return (
            f"preprocess ({self.origin}): resize {self.resize} {self.interpolation}, centre crop "
            f"{self.input_size}, mean {triple(self.mean)}, std {triple(self.std)}"
        )


def parse_triple(text: str | None, option: str) -> tuple[float, ...] | None:
    """`0.485,0.456,0.406` -> three floats; anything else is a UserError naming the option."""
    if text is None:
        return None
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise UserError(
            f"{option} takes three numbers (R,G,B), e.g. 0.485,0.456,0.406; got {text!r}"
        )
    return values


def imagenet_defaults() -> Chosen:
    return Chosen(
        DEFAULT_SIZE,
        DEFAULT_RESIZE,
        "bilinear",
        tuple(IMAGENET_MEAN),
        tuple(IMAGENET_STD),
        "ImageNet defaults",
    )


def _fixed_size(model: nn.Module) -> int | None:
    """The square input size a timm model is built for, where it takes no other (a ViT's)."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None or getattr(model, "dynamic_img_size", False):
        return None
    if not getattr(patch_embed, "strict_img_size", True):
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(h) if h == w else None


def from_timm(model: nn.Module, name: str) -> Chosen:
    """timm's evaluation preprocessing for the model (its pretrained config)."""
    from timm.data import resolve_model_data_config

    config: dict[str, Any] = resolve_model_data_config(model)
    if config.get("crop_mode", "center") != "center":
        raise UserError(
            f"timm evaluates {name} with crop_mode {config['crop_mode']!r}; model packages "
            "centre-crop: give --input-size and --resize to accept a centre crop"
        )
    _, h, w = config["input_size"]
    fixed = _fixed_size(model)
    size = fixed or int(h)
    note = f" at the model's img_size {size}" if fixed and fixed != h else ""
    if h != w and not fixed:
        raise UserError(f"timm's input size for {name} is {h} x {w}; give --input-size")
    crop_pct = float(config.get("crop_pct") or DEFAULT_SIZE / DEFAULT_RESIZE)
    return Chosen(
        size,
        math.floor(size / crop_pct),  # timm's eval transform: floor(size / crop_pct)
        str(config["interpolation"]),
        tuple(float(x) for x in config["mean"]),
        tuple(float(x) for x in config["std"]),
        f"timm's pretrained config of {name}{note}",
    )


def torchvision_entry(arch: str, weights: Path, sha256: str, weights_name: str | None) -> Any:
    """The torchvision weights entry (e.g. ResNet50_Weights.IMAGENET1K_V2) the file is, or None.

    By `weights_name` if given; else by the file name of the entry's url, or the sha256 prefix
    torchvision puts in it (`resnet50-11ad3fa6.pth`: the file's sha256 starts 11ad3fa6).
    """
    import torchvision

    entries = list(torchvision.models.get_model_weights(arch))
    if weights_name is not None:
        for entry in entries:
            if weights_name in (str(entry), f"{type(entry).__name__}.{entry.name}", entry.name):
                return entry
        names = ", ".join(f"{type(e).__name__}.{e.name}" for e in entries) or "none"
        raise UserError(f"--weights-name {weights_name} is not one of {arch}'s weights ({names})")
    for entry in entries:
        url_name = Path(entry.url).name
        digest = Path(entry.url).stem.rsplit("-", 1)[-1]
        if weights.name == url_name or (len(digest) >= 8 and sha256.startswith(digest)):
            return entry
    return None


def from_torchvision(entry: Any) -> Chosen:
    """The evaluation transform of a torchvision weights entry (its `transforms()`)."""
    transform = entry.transforms()
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    return Chosen(
        int(crop),
        int(resize),
        transform.interpolation.value,
        tuple(float(x) for x in transform.mean),
        tuple(float(x) for x in transform.std),
        f"torchvision {type(entry).__name__}.{entry.name}",
    )


def apply_options(base: Chosen, options: PreprocessOptions) -> Chosen:
    """The options given explicitly over `base`; a new --input-size keeps base's crop fraction."""
    given = [k for k, v in dataclasses.asdict(options).items() if v is not None]
    size = options.input_size or base.input_size
    resize = options.resize
    if resize is None:
        resize = (
            base.resize
            if size == base.input_size
            else math.floor(size * base.resize / base.input_size)
        )
    chosen = Chosen(
        size,
        resize,
        options.interpolation or base.interpolation,
        options.mean or base.mean,
        options.std or base.std,
        base.origin + "".join(f"; --{k.replace('_', '-')} given" for k in given),
    )
    if chosen.interpolation not in INTERPOLATIONS:  # what serving's resize can apply
        raise UserError(
            f"interpolation {chosen.interpolation!r} ({chosen.origin}) is not one model packages "
            f"apply; give --interpolation {' or '.join(INTERPOLATIONS)}"
        )
    if chosen.resize > MAX_RESIZE:  # serving resizes every image to it: bounded like --input-size
        raise UserError(f"--resize must be at most {MAX_RESIZE} px, got {chosen.resize}")
    if chosen.resize < chosen.input_size:
        raise UserError(f"--resize ({chosen.resize}) must be at least the input size ({size})")
    if not all(s > 0 for s in chosen.std):
        raise UserError(f"--std must be positive, got {','.join(map(str, chosen.std))}")
    return chosen
