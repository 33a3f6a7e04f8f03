"""The optimiser a run's config names: SGD with momentum, AdamW, or LARS (timm's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from mocoserve.train.config import OptimConfig


def build_optimizer(o: OptimConfig, module: nn.Module, lr: float) -> torch.optim.Optimizer:
    """`o.optimizer` over the parameters of `module` that train, at learning rate `lr`.

    LARS follows moco-v3's: weights (ndim > 1) get weight decay and the trust-ratio
    adaptation; biases and norm parameters neither (plain momentum SGD).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)
    if o.optimizer == "lars":
        from timm.optim import Lars

        groups = [
            {"params": [p for p in params if p.ndim > 1], "always_adapt": True},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
        return Lars(
            [g for g in groups if g["params"]],
            lr=lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
        )
    return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
