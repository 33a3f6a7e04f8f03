"""MoCo v3 (Chen, Xie, He, ICCV 2021): a symmetrised contrastive loss against momentum keys.

After the authors' moco/builder.py: query encoder = backbone + projection MLP + prediction
MLP; momentum encoder = backbone + projection, its momentum rising from m to 1 on a cosine;
keys of the other view gathered from every rank, no queue; ViT's patch projection frozen.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mocoserve.core.errors import UserError
from mocoserve.train import distributed
from mocoserve.train.losses import moco_v3_logits
from mocoserve.train.methods.base import Method
from mocoserve.train.models import Encoder, build_backbone, has_batchnorm

if TYPE_CHECKING:
    from mocoserve.train.config import ModelConfig, TrainConfig


def mlp(layers: int, in_dim: int, hidden: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """The reference's _build_mlp: Linear (no bias), BN, ReLU between; a last BN without affine."""
    parts: list[nn.Module] = []
    for i in range(layers):
        d_in = in_dim if i == 0 else hidden
        d_out = out_dim if i == layers - 1 else hidden
        parts.append(nn.Linear(d_in, d_out, bias=False))
        if i < layers - 1:
            parts += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            parts.append(nn.BatchNorm1d(d_out, affine=False))  # SimCLR's, without gamma
    return nn.Sequential(*parts)


def momentum_at(step: int, total_steps: int, m0: float) -> float:
    """The momentum at `step`: m0 at 0, rising on a half cosine to 1 at total_steps."""
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - m0)


def meta_backbone(model: ModelConfig) -> nn.Module:
    """The backbone built on the meta device: its layers without weights (well under a
    second even for a ViT-B), to see what it is made of."""
    with torch.device("meta"):
        net, _ = build_backbone(dataclasses.replace(model, bn_splits=1))
    return net


def backbone_family(net: nn.Module) -> str:
    """'resnet' for backbones with BatchNorm (the paper's ResNet recipe), else 'vit' (ViT,
    ConvNeXt, Swin: LayerNorm nets take the ViT recipe)."""
    return "resnet" if has_batchnorm(net) else "vit"


class MoCoV3(Method):
    """Two views, both through both encoders; loss ctr(q1, k2) + ctr(q2, k1), keys gathered.

    `contrast_top1`: how often a query's own key scores highest among the global batch's keys.
    """

    compile_targets = ("query_encoder", "key_encoder")
    freezes_patch_embed = True

    key_encoder: Encoder  # backbone + projector, no gradient

    @classmethod
    def build_encoder(cls, cfg: TrainConfig) -> Encoder:
        """An Encoder whose head is the projector then the predictor (state: head.projector.*,
        head.predictor.*), so export's `head` output is the query q of the paper."""
        m = cfg.model
        encoder = Encoder(m)
        hidden = m.hidden_dim or encoder.feature_dim
        encoder.head = nn.Sequential(
            OrderedDict(
                projector=mlp(m.proj_layers, encoder.feature_dim, hidden, m.dim, last_bn=True),
                predictor=mlp(2, m.dim, hidden, m.dim, last_bn=m.pred_last_bn),
            )
        )
        return encoder

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        super().check_config(cfg)
        if cfg.optim.batch_size < 2:  # the MLPs' BatchNorm1d cannot train on one sample
            raise UserError(
                f"moco-v3 needs --batch-size of at least 2 per process (BatchNorm in its MLPs), "
                f"got {cfg.optim.batch_size}"
            )

    @classmethod
    def adopt_config(cls, cfg: TrainConfig, explicit: dict[str, Any]) -> None:
        """The registry's ViT or ResNet recipe, by the backbone, where not set explicitly."""
        from mocoserve.train.config import apply_overrides
        from mocoserve.train.methods import get_spec

        super().adopt_config(cfg, explicit)
        net = meta_backbone(cfg.model)
        family = backbone_family(net)
        recipe = get_spec(cfg.method.name).by_backbone.get(family, {})
        apply_overrides(
            cfg, {k: v for k, v in recipe.items() if k not in explicit}, "method default"
        )
        if explicit.get("method.freeze_patch_embed") and not hasattr(net, "patch_embed"):
            raise UserError(
                f"method.freeze_patch_embed freezes a ViT's patch projection; {cfg.model.arch} "
                "has none (leave it unset)"
            )

    def __init__(self, cfg: TrainConfig, num_classes: int = 0) -> None:
        super().__init__(cfg, num_classes)
        backbone = self.query_encoder.backbone
        _zero_init_residual(backbone)
        patch_embed = getattr(backbone, "patch_embed", None)
        self.frozen_patch_embed = bool(cfg.method.freeze_patch_embed and patch_embed is not None)
        if self.frozen_patch_embed:
            _random_patch_projection(patch_embed)
        self.key_encoder = copy.deepcopy(self.query_encoder)
        self.key_encoder.head = self.key_encoder.head.projector  # momentum: no predictor
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        self.temperature = cfg.method.temperature
        self.base_momentum = cfg.method.momentum
        self.momentum = cfg.method.momentum  # set each step by on_train_step

    def on_train_step(self, step: int, total_steps: int) -> None:
        self.momentum = momentum_at(step, total_steps, self.base_momentum)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        """key = m * key + (1 - m) * query over backbone and projector, fused."""
        q = self.query_encoder
        q_params = [*q.backbone.parameters(), *q.head.projector.parameters()]
        k_params = list(self.key_encoder.parameters())
        torch._foreach_lerp_(k_params, q_params, 1.0 - self.momentum)

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        x1, x2 = views[0], views[1]
        # one pass per view, as the reference: the MLPs' BN sees each view's batch on its own
        q1 = F.normalize(self.query_encoder(x1).float(), dim=1)  # N x D
        q2 = F.normalize(self.query_encoder(x2).float(), dim=1)  # N x D
        with torch.no_grad():
            self._momentum_update()
            k1 = F.normalize(self.key_encoder(x1).float(), dim=1)  # N x D
            k2 = F.normalize(self.key_encoder(x2).float(), dim=1)  # N x D
        gather = distributed.world_size() > 1
        logits_12, labels_12 = moco_v3_logits(q1, k2, self.temperature, gather)  # N x G
        logits_21, labels_21 = moco_v3_logits(q2, k1, self.temperature, gather)  # N x G
        scale = 2 * self.temperature  # the reference's x 2T
        loss = scale * (
            F.cross_entropy(logits_12, labels_12) + F.cross_entropy(logits_21, labels_21)
        )
        with torch.no_grad():
            hits = (logits_12.argmax(dim=1) == labels_12).float().mean()
            hits = hits + (logits_21.argmax(dim=1) == labels_21).float().mean()
        return {"loss": loss, "contrast_top1": hits * 50.0}


def _zero_init_residual(backbone: nn.Module) -> None:
    """Each torchvision residual block's last BN starts at 0 (the reference's ResNets)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for m in backbone.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)


def _random_patch_projection(patch_embed: nn.Module) -> None:
    """Xavier-uniform on the projection as an E x (3*p*p) matrix, bias 0, then frozen (vits.py)."""
    proj = getattr(patch_embed, "proj", None)
    if isinstance(proj, nn.Conv2d):
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)
    for p in patch_embed.parameters():
        p.requires_grad_(False)
