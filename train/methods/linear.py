"""MoCo's linear classification protocol: a frozen pretrained backbone in eval mode, a new fc."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mocoserve.core.errors import RunError, UserError
from mocoserve.train.methods.base import Method

if TYPE_CHECKING:
    from mocoserve.train.config import TrainConfig
    from mocoserve.train.evaluate import Evaluator
    from mocoserve.train.models import Encoder

# what the probe takes from the pretraining checkpoint's config unless given explicitly
NETWORK_FIELDS = (
    "model.arch",
    "model.small_stem",
    "model.head",
    "model.dim",
    "model.hidden_dim",
    "model.timm_kwargs",  # a timm backbone is rebuilt with the sizes it was trained at
)
IMAGE_FIELDS = ("data.image_size", "data.eval_resize", "data.mean", "data.std")


class LinearProbe(Method):
    """Only `fc` trains; the backbone and its BN statistics must not move (checked at the end)."""

    needs_labels = True
    num_views = 1
    trains_encoder = False
    report_file = "lincls.json"

    def __init__(self, cfg: TrainConfig, num_classes: int = 0) -> None:
        super().__init__(cfg, num_classes)  # only .backbone is used; .head is kept for loading
        for p in self.query_encoder.parameters():
            p.requires_grad_(False)
        self.pretrained = cfg.method.pretrained
        self.fc = nn.Linear(self.query_encoder.feature_dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        self._reference: dict[str, torch.Tensor] = {}

    @classmethod
    def build_encoder(cls, cfg: TrainConfig) -> Encoder:
        """The pretraining method's network (a moco-v3 encoder has its own head to load)."""
        from mocoserve.train import checkpoint
        from mocoserve.train.methods import get_spec

        pre = checkpoint.load(cfg.method.pretrained)  # type: ignore[arg-type]
        return get_spec(pre["config"]["method"]["name"]).cls.build_encoder(cfg)

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        if not cfg.method.pretrained:
            raise UserError(
                "the linear probe needs --pretrained CHECKPOINT (a pretraining checkpoint)"
            )

    @classmethod
    def adopt_config(cls, cfg: TrainConfig, explicit: dict[str, Any]) -> None:
        """The probe's network is the pretraining checkpoint's; so are its image settings."""
        from mocoserve.train import checkpoint
        from mocoserve.train.config import TrainConfig, get_field
        from mocoserve.train.methods import get_spec

        super().adopt_config(cfg, explicit)
        pre = checkpoint.load(cfg.method.pretrained)  # type: ignore[arg-type]
        pre_cfg = TrainConfig.from_dict(pre["config"])
        if not get_spec(pre_cfg.method.name).cls.trains_encoder:
            raise UserError(
                f"{cfg.method.pretrained} is a linear-probe checkpoint, not a pretraining one"
            )
        for key in NETWORK_FIELDS:
            if key in explicit and explicit[key] != get_field(pre_cfg, key):
                raise UserError(
                    f"{cfg.method.pretrained} holds a {key.split('.')[1]}="
                    f"{get_field(pre_cfg, key)!r} network, not {explicit[key]!r}"
                )
        cfg.model = pre_cfg.model
        cfg.model.bn_splits = 1  # the backbone runs in eval mode
        for key in IMAGE_FIELDS:
            if key not in explicit:
                setattr(cfg.data, key.partition(".")[2], get_field(pre_cfg, key))

    def on_fit_start(self) -> None:
        """Copy the pretraining checkpoint's query encoder in; remember its backbone."""
        from mocoserve.train import checkpoint

        pre = checkpoint.load(self.pretrained)  # type: ignore[arg-type]
        try:
            self.query_encoder.load_state_dict(checkpoint.query_encoder_state(pre))
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise UserError(f"{self.pretrained} does not fit this network: {first}") from None
        self._reference = {
            k: v.detach().clone().cpu() for k, v in self.query_encoder.backbone.state_dict().items()
        }

    def on_fit_end(self) -> None:
        """MoCo's lincls sanity check: the frozen backbone, BN statistics included, did not move."""
        for name, value in self.query_encoder.backbone.state_dict().items():
            if not torch.equal(value.cpu(), self._reference[name]):
                raise RunError(f"the linear probe changed the frozen backbone ({name})")

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.query_encoder.eval()  # BN statistics stay those of pretraining
        return self

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = self.query_encoder.features(images)  # N x feature_dim
        return self.fc(f.float())  # N x classes

    def evaluate(self, ev: Evaluator) -> dict[str, float]:
        acc = ev.accuracy(ev.rows(self.logits, ev.val_index))
        return {"val_top1": acc["top1"], "val_top5": acc["top5"]}

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.logits(views[0])
        return {"loss": F.cross_entropy(logits, labels)}
