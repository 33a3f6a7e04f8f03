"""Backbones and encoders: torchvision ResNets, a small-image stem, split BatchNorm, heads."""

from __future__ import annotations

from functools import partial
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


def build_backbone(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """A torchvision ResNet with its classifier removed; returns (module, feature dim)."""
    if cfg.arch not in resnet_names():
        raise UserError(f"unknown --arch {cfg.arch!r}; choose one of {', '.join(resnet_names())}")
    norm_layer = (
        partial(SplitBatchNorm, num_splits=cfg.bn_splits) if cfg.bn_splits > 1 else nn.BatchNorm2d
    )
    net = torchvision.models.get_model(cfg.arch, weights=None, norm_layer=norm_layer)
    if cfg.small_stem:  # CIFAR-style: keep 32 px images from shrinking to 1 px by layer4
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
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
