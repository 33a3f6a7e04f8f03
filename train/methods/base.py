"""What every method is: an nn.Module that owns its state and declares what the loop needs.

The Trainer reads a method's declarations (labels, views, queue, what to compile) and calls
its hooks (`on_fit_start`, `evaluate`, `on_fit_end`); it never tests a method's type or name.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mocoserve.train import distributed
from mocoserve.train.models import Encoder, check_input_size, has_batchnorm

if TYPE_CHECKING:
    from mocoserve.train.config import TrainConfig
    from mocoserve.train.evaluate import Evaluator


class Method(nn.Module):
    """A training method: `forward(views, labels)` returns {"loss": scalar, other scalars...}.

    Every scalar it returns is averaged and logged by the loop. The class attributes are the
    method's declarations; the hooks have do-nothing defaults.
    """

    needs_labels: ClassVar[bool] = False  # class/image folders only
    has_queue: ClassVar[bool] = False  # a queue of keys (method.queue_size must be >= 1)
    num_views: ClassVar[int] = 2  # augmented views of each image per step
    compile_targets: ClassVar[tuple[str, ...]] = ("query_encoder",)  # run.compile compiles these
    trains_encoder: ClassVar[bool] = True  # pretraining: export and the probe take its encoder
    report_file: ClassVar[str | None] = None  # final metrics written here when a run finishes
    # runs its key encoder with shuffled BN (method.shuffle_bn); only BN nets have any to shuffle
    shuffles_bn: ClassVar[bool] = False
    # keeps a ViT's random patch projection frozen when method.freeze_patch_embed (moco-v3)
    freezes_patch_embed: ClassVar[bool] = False

    query_encoder: Encoder
    shuffle_bn: bool  # shuffled BN asked for and the encoder has BatchNorm to shuffle
    notes: list[str]  # one line each, printed by the Trainer with its summary

    def __init__(self, cfg: TrainConfig, num_classes: int = 0) -> None:
        super().__init__()
        self.query_encoder = self.build_encoder(cfg)
        check_input_size(self.query_encoder.backbone, cfg.model.arch, cfg.data.image_size)
        self.notes = []
        asked = self.shuffles_bn and cfg.method.shuffle_bn
        # known only once the net is built: timm:<name> may be a ViT (LayerNorm) or a BN net
        self.shuffle_bn = asked and has_batchnorm(self.query_encoder)
        if not self.has_queue and cfg.method.queue_size > 0:
            self.notes.append(
                f"{cfg.method.name} keeps no queue of keys: --queue-size "
                f"{cfg.method.queue_size} does nothing here"
            )
        if asked and not self.shuffle_bn:
            self.notes.append(
                f"shuffled BN is off: {cfg.model.arch} has no BatchNorm (method.shuffle_bn "
                "does nothing here)"
            )

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        """Raise UserError for settings this method cannot run with."""
        if cls.has_queue and cfg.method.queue_size < 1:
            from mocoserve.core.errors import UserError

            raise UserError(f"{cfg.method.name} needs a queue: --queue-size must be at least 1")

    @classmethod
    def adopt_config(cls, cfg: TrainConfig, explicit: dict[str, Any]) -> None:
        """Complete the config before the run (the probe takes its network from a checkpoint).

        A subclass calls this first: options set explicitly that the method has no use for
        are refused here (a default never is, so a resumed checkpoint's config still runs).
        """
        if explicit.get("method.freeze_patch_embed") and not cls.freezes_patch_embed:
            from mocoserve.core.errors import UserError

            raise UserError(
                f"method.freeze_patch_embed is moco-v3's (a ViT's frozen patch projection); "
                f"{cfg.method.name} does not use it (leave it unset)"
            )

    @classmethod
    def build_encoder(cls, cfg: TrainConfig) -> Encoder:
        """The query encoder's network (what export and the probe load a checkpoint into)."""
        return Encoder(cfg.model)

    def on_train_step(self, step: int, total_steps: int) -> None:
        """Called before each training step's forward (e.g. a momentum schedule)."""

    def on_fit_start(self) -> None:
        """Called once the method is built, before it moves to the device or resumes."""

    def on_fit_end(self) -> None:
        """Called when a run finishes all its epochs: the method's final checks."""

    def evaluate(self, ev: Evaluator) -> dict[str, float]:
        """Figures on the val folder; pretraining methods: the k-NN monitor on backbone features."""
        encoder = self.query_encoder
        return ev.knn(lambda x: F.normalize(encoder.features(x).float(), dim=1))

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class MomentumQueueMethod(Method):
    """A query encoder, its momentum (key) encoder with shuffled BN, and a queue of keys."""

    has_queue = True
    shuffles_bn = True
    compile_targets = ("query_encoder", "key_encoder")

    key_encoder: Encoder
    queue: torch.Tensor  # K x D
    queue_labels: torch.Tensor  # K (-1: no label)
    queue_ptr: torch.Tensor  # 1

    def __init__(self, cfg: TrainConfig, num_classes: int = 0) -> None:
        super().__init__(cfg, num_classes)
        self.key_encoder = copy.deepcopy(self.query_encoder)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        self.temperature = cfg.method.temperature
        self.base_temperature = cfg.method.base_temperature
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
