"""The method registry: each method's name -> its class, paper defaults and preset settings.

After solo-learn's `solo/methods/__init__.py`: config defaults, validation, the Trainer's
checks, augmentation and export all read `METHODS`; nothing else compares method names.
A method's capabilities (labels, views, queue, what to compile) are its class's declarations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mocoserve.core.errors import UserError
from mocoserve.train.methods.base import Method, MomentumQueueMethod
from mocoserve.train.methods.linear import LinearProbe
from mocoserve.train.methods.moco import MoCo
from mocoserve.train.methods.mocov3 import MoCoV3
from mocoserve.train.methods.supcon import SupCon, SupConQueue

if TYPE_CHECKING:
    from mocoserve.train.config import TrainConfig

__all__ = [
    "METHODS",
    "LinearProbe",
    "Method",
    "MethodSpec",
    "MoCo",
    "MoCoV3",
    "MomentumQueueMethod",
    "SupCon",
    "SupConQueue",
    "build_method",
    "get_spec",
]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its class and the config values its paper uses.

    `by_backbone`: defaults that depend on the backbone, "resnet" (nets with BatchNorm) or
    "vit" (nets without: ViT, ConvNeXt, Swin); the class's adopt_config applies them to the
    fields not set explicitly (a preset's values are not explicit).
    """

    name: str
    cls: type[Method]
    paper: str
    defaults: Mapping[str, Any]  # dotted config fields (e.g. "method.temperature": 0.07)
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    by_backbone: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def augmentation(self) -> str:
        return str(self.defaults["data.augmentation"])


# The small-image preset's part for methods that pretrain (after the MoCo CIFAR-10 demo).
_CIFAR = {"optim.lr": 0.06, "optim.batch_size": 512, "optim.weight_decay": 5e-4}
_CIFAR_QUEUE = {
    **_CIFAR,
    "method.queue_size": 4096,
    "method.momentum": 0.99,
    "method.temperature": 0.1,
}

# MoCo v3 after its CONFIG.md: ViT-S/B 300 epochs (AdamW, lr 1.5e-4 per 256, wd 0.1, 40
# warm-up epochs, T=0.2, 3-layer projector, frozen patch projection, crop from 0.08);
# ResNet-50 100 epochs (LARS, lr 0.6 per 256, wd 1e-6, 10 warm-up epochs, T=1.0, 2-layer
# projector, crop from 0.2)
_V3_VIT = {
    "method.temperature": 0.2,
    "optim.optimizer": "adamw",
    "optim.lr": 1.5e-4,
    "optim.weight_decay": 0.1,
    "optim.epochs": 300,
    "optim.warmup_epochs": 40,
    "model.proj_layers": 3,
    "model.pred_last_bn": True,
    "data.min_crop_scale": 0.08,
    "method.freeze_patch_embed": True,
}
_V3_RESNET = {
    "method.temperature": 1.0,
    "optim.optimizer": "lars",
    "optim.lr": 0.6,
    "optim.weight_decay": 1e-6,
    "optim.epochs": 100,
    "optim.warmup_epochs": 10,
    "model.proj_layers": 2,
    "model.pred_last_bn": False,
    "data.min_crop_scale": 0.2,
}

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "moco-v1",
            MoCo,
            "He et al. 2020: linear head, T=0.07, lr 0.03 per 256, steps at 120/160 of 200",
            {
                "model.head": "linear",
                "method.temperature": 0.07,
                "optim.schedule": "step",
                "data.augmentation": "moco-v1",
            },
            {"cifar": _CIFAR_QUEUE},
        ),
        MethodSpec(
            "moco-v2",
            MoCo,
            "Chen et al. 2020: MLP head, T=0.2, aug+ (blur), cosine lr",
            {"model.head": "mlp", "method.temperature": 0.2, "data.augmentation": "moco-v2"},
            {"cifar": _CIFAR_QUEUE},
        ),
        MethodSpec(
            "moco-v3",
            MoCoV3,
            "Chen, Xie, He 2021: projector + predictor MLPs (hidden 4096, out 256), momentum "
            "0.99 -> 1 on a cosine, symmetrised in-batch loss x 2T, no queue; BYOL's recipe",
            {
                "model.dim": 256,
                "model.hidden_dim": 4096,
                "method.momentum": 0.99,
                "method.queue_size": 0,
                "optim.schedule": "cosine",
                "data.augmentation": "moco-v3",
                **_V3_RESNET,  # the default arch is resnet50; adopt_config picks by backbone
            },
            by_backbone={"vit": _V3_VIT, "resnet": _V3_RESNET},
        ),
        MethodSpec(
            "supcon",
            SupCon,
            "Khosla et al. 2020 (SupContrast): T=0.07, lr 0.05 per 256, no queue",
            {
                "method.temperature": 0.07,
                "method.queue_size": 0,
                "optim.lr": 0.05,
                "data.augmentation": "supcon",
            },
            {"cifar": _CIFAR},
        ),
        MethodSpec(
            "supcon-queue",
            SupConQueue,
            "SupCon's ImageNet setup: a MoCo-style momentum memory of 8192 labelled keys",
            {
                "method.temperature": 0.07,
                "method.queue_size": 8192,
                "data.augmentation": "supcon",
            },
            {"cifar": _CIFAR_QUEUE},
        ),
        MethodSpec(
            "linear",
            LinearProbe,
            "MoCo lincls: frozen backbone, lr 30, no weight decay, 100 epochs, steps at 60/80",
            {
                "method.queue_size": 0,
                "optim.epochs": 100,
                "optim.lr": 30.0,
                "optim.weight_decay": 0.0,
                "optim.schedule": "step",
                "optim.milestones": [60, 80],
                "data.augmentation": "linear",
            },
        ),
    )
}


def get_spec(name: str) -> MethodSpec:
    """The registered method called `name`; an unknown name is a UserError."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def build_method(cfg: TrainConfig, num_classes: int = 0) -> Method:
    """The method module named by cfg.method.name."""
    return get_spec(cfg.method.name).cls(cfg, num_classes)
