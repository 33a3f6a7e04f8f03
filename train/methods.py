"""Training methods: each an nn.Module that owns its state and turns a batch into a loss.

A method's `forward(views, labels)` returns {"loss": scalar, ...}; the training loop knows
nothing else about it. Momentum encoders and queues are submodules and registered buffers,
so they are saved in the state dict and follow `.to(device)`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from mocoserve.train import distributed
from mocoserve.train.config import TrainConfig
from mocoserve.train.losses import info_nce, supcon_loss, supcon_queue_loss
from mocoserve.train.models import Encoder
from torch import nn


class MomentumQueueMethod(nn.Module):
    """A query encoder, its momentum (key) encoder with shuffled BN, and a queue of keys."""

    query_encoder: Encoder
    key_encoder: Encoder
    queue: torch.Tensor  # K x D
    queue_labels: torch.Tensor  # K (-1: no label)
    queue_ptr: torch.Tensor  # 1

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.query_encoder = Encoder(cfg.model)
        self.key_encoder = copy.deepcopy(self.query_encoder)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        self.temperature = cfg.method.temperature
        self.base_temperature = cfg.method.base_temperature
        self.shuffle_bn = cfg.method.shuffle_bn
        self.momentum = cfg.method.momentum
        self.bn_splits = cfg.model.bn_splits
        queue_size, dim = cfg.method.queue_size, cfg.model.dim
        # random unit vectors as the first negatives, as in MoCo
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_labels", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update(self) -> None:
        """key = m * key + (1 - m) * query (MoCo eq. 2), fused over all parameters."""
        q_params = list(self.query_encoder.parameters())
        k_params = list(self.key_encoder.parameters())
        torch._foreach_lerp_(k_params, q_params, 1.0 - self.momentum)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Write every rank's keys at the queue pointer, wrapping around; any sizes work."""
        keys = distributed.all_gather(keys.contiguous())  # G x D, G = global batch
        if labels is None:
            labels = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        else:
            labels = distributed.all_gather(labels.contiguous())
        size, n = self.queue.shape[0], keys.shape[0]
        skip = max(0, n - size)  # a batch larger than the queue: only its newest keys survive
        # index arithmetic on the device: no host sync in the training step
        idx = (self.queue_ptr + skip + torch.arange(n - skip, device=keys.device)) % size
        self.queue.index_copy_(0, idx, keys[skip:].to(self.queue.dtype))
        self.queue_labels.index_copy_(0, idx, labels[skip:])
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    @torch.no_grad()
    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised keys of `images`, with BN shuffled so it cannot leak batch identity."""
        shuffle = self.shuffle_bn and (distributed.world_size() > 1 or self.bn_splits > 1)
        if not shuffle:
            return F.normalize(self.key_encoder(images).float(), dim=1)
        if distributed.world_size() > 1:
            return self._keys_shuffled_across_ranks(images)
        perm = torch.randperm(images.shape[0], device=images.device)
        k = F.normalize(self.key_encoder(images[perm]).float(), dim=1)
        return k[torch.argsort(perm)]

    @torch.no_grad()
    def _keys_shuffled_across_ranks(self, images: torch.Tensor) -> torch.Tensor:
        """MoCo's shuffle BN: gather, permute globally (rank 0's permutation), run, unshuffle."""
        n = images.shape[0]
        gathered = distributed.all_gather(images)  # G x C x H x W
        perm = torch.randperm(gathered.shape[0], device=images.device)
        distributed.broadcast(perm, src=0)
        mine = perm.view(distributed.world_size(), n)[distributed.rank()]
        k = F.normalize(self.key_encoder(gathered[mine]).float(), dim=1)  # n x D
        k_all = distributed.all_gather(k)  # G x D in permuted order
        unshuffle = torch.argsort(perm).view(distributed.world_size(), n)[distributed.rank()]
        return k_all[unshuffle]


class MoCo(MomentumQueueMethod):
    """MoCo v1/v2 (He et al. 2020; Chen et al. 2020): InfoNCE against a queue of momentum keys."""

    num_views = 2
    needs_labels = False

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        im_q, im_k = views[0], views[1]
        q = F.normalize(self.query_encoder(im_q).float(), dim=1)  # N x D
        with torch.no_grad():
            self._momentum_update()
            k = self._keys(im_k)  # N x D
        # clone: the enqueue below must not change what backward reads
        loss = info_nce(q, k, self.queue.clone(), self.temperature)
        self._enqueue(k)
        return {"loss": loss}


class SupCon(nn.Module):
    """SupCon (Khosla et al. 2020): two views per image, positives are same-label views."""

    num_views = 2
    needs_labels = True

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.query_encoder = Encoder(cfg.model)
        self.temperature = cfg.method.temperature
        self.base_temperature = cfg.method.base_temperature
        self.contrast_mode = cfg.method.contrast_mode

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        b = views[0].shape[0]
        z = F.normalize(self.query_encoder(torch.cat(views)).float(), dim=1)  # (V*B) x D
        features = z.view(len(views), b, -1).transpose(0, 1)  # B x V x D
        loss = supcon_loss(
            features,
            labels,
            self.temperature,
            self.base_temperature,
            self.contrast_mode,
            gather_distributed=distributed.world_size() > 1,
        )
        return {"loss": loss}


class SupConQueue(MomentumQueueMethod):
    """SupCon with a MoCo-style momentum encoder and a queue of keys with their labels."""

    num_views = 2
    needs_labels = True

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        q = F.normalize(self.query_encoder(views[0]).float(), dim=1)  # N x D
        with torch.no_grad():
            self._momentum_update()
            k = self._keys(views[1])  # N x D
        loss = supcon_queue_loss(
            q,
            k,
            labels,
            self.queue.clone(),
            self.queue_labels.clone(),
            self.temperature,
            self.base_temperature,
        )
        self._enqueue(k, labels)
        return {"loss": loss}


class LinearProbe(nn.Module):
    """MoCo's linear classification protocol: a frozen backbone in eval mode, a trained fc."""

    num_views = 1
    needs_labels = True

    def __init__(self, cfg: TrainConfig, num_classes: int) -> None:
        super().__init__()
        self.query_encoder = Encoder(cfg.model)  # only .backbone is used; .head is kept for loading
        for p in self.query_encoder.parameters():
            p.requires_grad_(False)
        self.fc = nn.Linear(self.query_encoder.feature_dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.query_encoder.eval()  # BN statistics stay those of pretraining
        return self

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = self.query_encoder.features(images)  # N x feature_dim
        return self.fc(f.float())  # N x classes

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.logits(views[0])
        return {"loss": F.cross_entropy(logits, labels)}


def build_method(cfg: TrainConfig, num_classes: int = 0) -> nn.Module:
    """The method module named by cfg.method.name."""
    name = cfg.method.name
    if name in ("moco-v1", "moco-v2"):
        return MoCo(cfg)
    if name == "supcon":
        return SupCon(cfg)
    if name == "supcon-queue":
        return SupConQueue(cfg)
    if name == "linear":
        return LinearProbe(cfg, num_classes)
    raise ValueError(f"unknown method {name!r}")
