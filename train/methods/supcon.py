"""SupCon (Khosla et al. 2020), in-batch and against a MoCo-style queue of labelled keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mocoserve.train import distributed
from mocoserve.train.losses import supcon_loss, supcon_queue_loss
from mocoserve.train.methods.base import Method, MomentumQueueMethod

if TYPE_CHECKING:
    from mocoserve.train.config import TrainConfig


class SupCon(Method):
    """Two views per image; positives are the views of same-label images, across ranks."""

    needs_labels = True

    def __init__(self, cfg: TrainConfig, num_classes: int = 0) -> None:
        super().__init__(cfg, num_classes)
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
