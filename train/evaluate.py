"""Evaluation during training: a function over every image of a folder, sharded over ranks.

`Evaluator` runs a function (features, logits) over a labelled folder with the eval
transform and gathers the rows in order; a method's `evaluate` builds its figures on it
(the k-NN monitor for pretraining, val top-1/top-5 for the linear probe).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from mocoserve.train import distributed
from mocoserve.train.augment import eval_transform
from mocoserve.train.data import FolderIndex, ImageDataset, ShardSampler, make_loader
from mocoserve.train.knn import topk_accuracy, weighted_knn_scores

if TYPE_CHECKING:
    from mocoserve.train.config import TrainConfig

Rows = Callable[[torch.Tensor], torch.Tensor]


class Evaluator:
    """Runs functions over the training and val folders for a method's `evaluate`."""

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        train_index: FolderIndex,
        val_index: FolderIndex,
        autocast: Callable[[], torch.autocast],
        to_device: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.train_index = train_index
        self.val_index = val_index
        self.batch_size = max(cfg.optim.batch_size, 64)
        self._autocast = autocast
        self._to_device = to_device

    @property
    def val_labels(self) -> torch.Tensor:
        return torch.tensor(self.val_index.labels, device=self.device)

    @torch.no_grad()
    def rows(self, fn: Rows, index: FolderIndex) -> torch.Tensor:
        """fn over every image of `index` (eval transform), sharded over ranks, in order."""
        dataset = ImageDataset(
            index.files, index.labels, eval_transform(self.cfg.data), self.cfg.run.seed
        )
        loader = make_loader(
            dataset,
            ShardSampler(len(index)),
            self.batch_size,
            self.cfg.data.resolved_workers(),
            pin_memory=self.device.type == "cuda",
            drop_last=False,
            persistent=False,
        )
        outputs = []
        for images, _ in loader:
            with self._autocast():
                outputs.append(fn(self._to_device(images)).float())
        local = torch.cat(outputs)  # per_rank x D
        world = distributed.world_size()
        gathered = distributed.all_gather(local)  # (W * per_rank) x D, rank-major
        per_rank = local.shape[0]
        return (
            gathered.view(world, per_rank, -1)
            .transpose(0, 1)
            .reshape(world * per_rank, -1)[: len(index)]
        )

    def accuracy(self, scores: torch.Tensor) -> dict[str, float]:
        """Top-1/top-5 of val class scores (Q x classes), in percent."""
        return topk_accuracy(scores, self.val_labels)

    def knn(self, features: Rows) -> dict[str, float]:
        """Weighted k-NN top-1/top-5 of the val folder against the labelled training folder.

        Unlabelled training data: leave-one-out k-NN within the val folder.
        """
        k, t = self.cfg.run.knn_k, self.cfg.run.knn_temperature
        val = self.rows(features, self.val_index)
        classes = len(self.val_index.classes)
        if self.train_index.labelled:
            bank = self.rows(features, self.train_index)
            bank_labels = torch.tensor(self.train_index.labels, device=self.device)
            scores = weighted_knn_scores(bank, bank_labels, val, classes, k, t)
        else:
            labels = self.val_labels
            scores = weighted_knn_scores(val, labels, val, classes, k, t, exclude_self=True)
        acc = self.accuracy(scores)
        return {"knn_top1": acc["top1"], "knn_top5": acc["top5"]}
