"""Backbones and encoders: torchvision ResNets, a small-image stem, split BatchNorm, heads."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from mocoserve.core.errors import UserError

if TYPE_CHECKING:
    from mocoserve.train.config import ModelConfig


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm over `num_splits` equal chunks of the batch, as on that many GPUs.

    From the MoCo CIFAR-10 demo: in one process it stops the query and key encoders from
    sharing batch statistics, which MoCo's shuffled BN otherwise gets from separate GPUs.
    Split j holds samples j, j+S, j+2S, ... Eval mode is plain BatchNorm, and the state
    dict is BatchNorm2d's, so exports need nothing special.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % self.num_splits:
            raise ValueError(f"batch of {n} does not split into {self.num_splits} BN groups")
        s = self.num_splits
        running_mean = self.running_mean.repeat(s)  # (S*C)
        running_var = self.running_var.repeat(s)
        # N x C x H x W -> (N/S) x (S*C) x H x W: each split's channels normalised on their own
        out = F.batch_norm(
            x.reshape(n // s, s * c, h, w),
            running_mean,
            running_var,
            self.weight.repeat(s),
            self.bias.repeat(s),
            True,
            self.momentum if self.momentum is not None else 0.1,
            self.eps,
        ).reshape(n, c, h, w)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(s, c).mean(dim=0))
            self.running_var.copy_(running_var.view(s, c).mean(dim=0))
            self.num_batches_tracked.add_(1)
        return out


def resnet_names() -> list[str]:
    """The torchvision ResNet family names we accept as --arch."""
    return sorted(
        n
        for n in torchvision.models.list_models(module=torchvision.models)
        if n.startswith(("resnet", "resnext", "wide_resnet"))
    )


TIMM_PREFIX = "timm:"
# create_model arguments that would load weights or configs from elsewhere (files, the hub)
TIMM_RESERVED = (
    "pretrained",
    "num_classes",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "checkpoint_path",
    "cache_dir",
    "pretrained_strict",
)
# ... and those that change the output from pooled features to something else
TIMM_SHAPING = ("features_only", "out_indices", "feature_cls")
# size arguments (an int, or one per stage) far beyond any real net: refused before a build,
# which for a depth of 100000 would take minutes even without weights (ViT-22B: depth 48,
# width 6144, 48 heads)
TIMM_BOUNDS = {
    "depth": 1000,
    "depths": 1000,
    "layers": 1000,
    "num_layers": 1000,
    "embed_dim": 65536,
    "embed_dims": 65536,
    "dims": 65536,
    "width": 65536,
    "num_heads": 4096,
}


def is_timm(arch: str) -> bool:
    """Whether --arch names a timm model (`timm:<name>`) rather than a torchvision ResNet."""
    return arch.startswith(TIMM_PREFIX)


def check_arch(arch: str) -> None:
    """A UserError naming the choices if `arch` is neither a torchvision ResNet nor timm's."""
    if is_timm(arch):
        name = arch[len(TIMM_PREFIX) :]
        try:
            import timm
        except ImportError:
            raise UserError(f"--arch {arch} needs timm: pip install 'mocoserve[train]'") from None
        if not name or not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=5) if name else []
            hint = f" (closest: {', '.join(close)})" if close else ""
            raise UserError(f"unknown timm model {name!r} in --arch {arch}{hint}")
        return
    if arch not in resnet_names():
        raise UserError(
            f"unknown --arch {arch!r}; choose a torchvision ResNet ({', '.join(resnet_names())})"
            " or timm:<name> (e.g. timm:vit_small_patch16_224, timm:convnext_tiny)"
        )


def has_batchnorm(module: nn.Module) -> bool:
    """Whether any BatchNorm layer is inside (what shuffled and split BN act on)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class SplitBatchNormAct(SplitBatchNorm):
    """timm's BatchNormAct2d (BN, then dropout and activation) with split BN statistics."""

    def __init__(
        self, num_features: int, num_splits: int, drop: nn.Module, act: nn.Module, **kwargs: object
    ) -> None:
        super().__init__(num_features, num_splits, **kwargs)
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Every BatchNorm2d inside (timm's BatchNormAct2d too) replaced by a split one, same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm):
            kwargs = {
                "eps": child.eps,
                "momentum": child.momentum,
                "affine": child.affine,
                "track_running_stats": child.track_running_stats,
            }
            if type(child) is nn.BatchNorm2d:
                split: SplitBatchNorm = SplitBatchNorm(child.num_features, num_splits, **kwargs)
            elif type(child).__name__ == "BatchNormAct2d":  # timm: BN, dropout, act in one
                drop, act = child.drop, child.act  # type: ignore[union-attr]
                split = SplitBatchNormAct(child.num_features, num_splits, drop, act, **kwargs)
            else:
                continue  # left for the check in build_backbone to name
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            split_batchnorm(child, num_splits)
    return module


def check_input_size(backbone: nn.Module, arch: str, image_size: int) -> None:
    """A UserError if the backbone takes one input size only (a timm ViT) and it is not ours."""
    patch_embed = getattr(backbone, "patch_embed", None)
    if not getattr(patch_embed, "strict_img_size", False):
        return  # convolutional nets (and dynamic_img_size ViTs) take any size
    size = tuple(patch_embed.img_size)  # type: ignore[union-attr]
    if size != (image_size, image_size):
        raise UserError(
            f"{arch} takes {size[0]}x{size[1]} px images, but --image-size is {image_size}; "
            f"give --image-size {size[0]} or set model.timm_kwargs img_size: {image_size}"
        )


def _timm_backbone(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """timm's model with `num_classes=0` (its pooled features), never downloading weights.

    The Trainer's channels_last (CUDA) is safe here: `.to(memory_format=...)` only restrides
    4-D tensors (a ViT's patch-embedding conv); a ViT flattens to tokens right after it, and
    flatten/transpose take any strides, so only the convolutional nets gain speed from it.
    """
    import timm

    name = cfg.arch[len(TIMM_PREFIX) :]
    kwargs = dict(cfg.timm_kwargs)
    for reserved in TIMM_RESERVED:
        if reserved in kwargs:
            raise UserError(f"model.timm_kwargs cannot set {reserved!r}; weights come from a file")
    for shaping in TIMM_SHAPING:
        if shaping in kwargs:
            raise UserError(
                f"model.timm_kwargs cannot set {shaping!r}: features are timm's pooled N x D output"
            )
    for rate in (k for k in kwargs if "drop" in k and k.endswith("_rate")):  # drop_path_rate, …
        value = kwargs[rate]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise UserError(f"model.timm_kwargs {rate} must be from 0 to below 1, got {value!r}")
    if "global_pool" in kwargs and not kwargs["global_pool"]:
        raise UserError("model.timm_kwargs global_pool must pool (e.g. avg, token): not empty")
    _check_sizes(kwargs)
    on_meta = torch.get_default_device().type == "meta"
    if not on_meta:  # its layers without weights first (well under a second): will it fit?
        try:
            with torch.device("meta"):
                probe = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        except Exception:  # a net that cannot be built on meta: the real build says why
            probe = None
        if probe is not None:
            _check_weights(cfg.arch, kwargs, probe)
    try:
        net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except Exception as e:  # any failure to build from the user's kwargs is theirs to fix
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, MemoryError) or "out of memory" in first or "can't allocate" in first:
            raise UserError(
                f"building {cfg.arch} with timm_kwargs {kwargs} ran out of memory: {first}"
            ) from None
        raise UserError(f"timm cannot build {name} with timm_kwargs {kwargs}: {first}") from None
    if on_meta:
        _check_weights(cfg.arch, kwargs, net)
    if cfg.small_stem:
        raise UserError(
            "model.small_stem is for torchvision ResNets; size timm models with "
            "model.timm_kwargs (img_size, patch_size)"
        )
    return net, int(net.num_features)


def _check_sizes(kwargs: dict) -> None:
    """A UserError for a size argument beyond TIMM_BOUNDS (an int, or each of a list's)."""
    for key, bound in TIMM_BOUNDS.items():
        value = kwargs.get(key)
        values = value if isinstance(value, list | tuple) else [value]
        big = [v for v in values if type(v) is int and v > bound]
        if big:
            raise UserError(
                f"model.timm_kwargs {key}: {value!r} is far beyond any real net (at most "
                f"{bound}{' each' if isinstance(value, list | tuple) else ''}); it would not "
                "fit in memory"
            )


def _check_weights(arch: str, kwargs: dict, net: nn.Module) -> None:
    """A UserError when the net's weights (built on meta: no memory) exceed half the
    machine's memory: a run holds at least two copies (query and key encoders, or the net
    and the checkpoint it loads), so it could only end killed, without a word."""
    need = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    have = _machine_memory()
    if have and need > have // 2:
        raise UserError(
            f"building {arch} with timm_kwargs {kwargs} needs {need / 2**30:.1f} GiB for its "
            f"weights alone, over half of this machine's {have / 2**30:.1f} GiB of memory; "
            "make it smaller"
        )


def _machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit if lower
    (0 when unknown)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and (not total or int(text) < total):
            total = int(text)
    return total


def build_backbone(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """The backbone without its classifier and its feature dim: a torchvision ResNet, or timm's.

    Weights are always random here (no download at run time); they come from a checkpoint or
    a weights file. `bn_splits > 1` turns every BatchNorm2d into a SplitBatchNorm.
    """
    check_arch(cfg.arch)
    if is_timm(cfg.arch):
        net, feature_dim = _timm_backbone(cfg)
    else:
        if cfg.timm_kwargs:
            raise UserError(f"model.timm_kwargs is for timm:<name> models, not {cfg.arch}")
        net = torchvision.models.get_model(cfg.arch, weights=None)
        if cfg.small_stem:  # CIFAR-style: keep 32 px images from shrinking to 1 px by layer4
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        feature_dim = net.fc.in_features
        net.fc = nn.Identity()
    if cfg.bn_splits > 1:
        if not has_batchnorm(net):
            raise UserError(
                f"model.bn_splits={cfg.bn_splits} splits BatchNorm, but {cfg.arch} has none; "
                "leave --bn-splits at 1"
            )
        split_batchnorm(net, cfg.bn_splits)
        left = {
            type(m).__name__
            for m in net.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, SplitBatchNorm)
        }
        if left:
            raise UserError(
                f"model.bn_splits cannot split the {', '.join(sorted(left))} layers of "
                f"{cfg.arch}; leave --bn-splits at 1"
            )
    return net, feature_dim


def build_head(cfg: ModelConfig, in_dim: int) -> nn.Module:
    if cfg.head == "linear":
        return nn.Linear(in_dim, cfg.dim)
    hidden = cfg.hidden_dim or in_dim
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cfg.dim)
    )


class Encoder(nn.Module):
    """Backbone plus projection head; `forward` gives head outputs, `features` backbone ones."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.backbone, self.feature_dim = build_backbone(cfg)
        self.head = build_head(cfg, self.feature_dim)
        self.embedding_dim = cfg.dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # N x feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # N x dim
