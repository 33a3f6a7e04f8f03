"""MoCo v1/v2 (He et al. 2020; Chen et al. 2020): InfoNCE against a queue of momentum keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mocoserve.train.losses import info_nce_logits, positive_rank_accuracy
from mocoserve.train.methods.base import MomentumQueueMethod


class MoCo(MomentumQueueMethod):
    """Query encoder + momentum key encoder + queue; returns the loss and MoCo's Acc@1/Acc@5.

    `contrast_top1`/`contrast_top5`: how often the positive key outranks (top 1) or is among
    the five best of the 1+K logits; the health signal MoCo's own training script prints.
    """

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        im_q, im_k = views[0], views[1]
        q = F.normalize(self.query_encoder(im_q).float(), dim=1)  # N x D
        with torch.no_grad():
            self._momentum_update()
            k = self._keys(im_k)  # N x D
        # clone: the enqueue below must not change what backward reads
        logits = info_nce_logits(q, k, self.queue.clone(), self.temperature)  # N x (1+K)
        targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        loss = F.cross_entropy(logits, targets)
        top1, top5 = positive_rank_accuracy(logits.detach(), (1, 5))
        self._enqueue(k)
        return {"loss": loss, "contrast_top1": top1, "contrast_top5": top5}
