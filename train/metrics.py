"""MetricsLog: averages every scalar a method returns, decides when to log, writes JSONL + TB.

Scalars stay on the device between log steps (no host sync in the training step); at a log
step they are averaged over the window and over ranks in one all-reduce.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from mocoserve.core.errors import RunError
from mocoserve.train import distributed


class MetricsLog:
    """metrics.jsonl and TensorBoard (written by one rank); window and epoch averages."""

    def __init__(
        self,
        out_dir: str | Path,
        log_every: int,
        images_per_step: int,
        device: torch.device,
        writer: bool = True,
    ) -> None:
        self.log_every = log_every
        self.images_per_step = images_per_step
        self.device = device
        self.writer = writer
        self.file = None
        self.tb = None
        if writer:
            self.file = open(Path(out_dir) / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
        self._window: dict[str, torch.Tensor] = {}
        self._window_steps = 0
        self._window_start = time.perf_counter()
        self._epoch: dict[str, torch.Tensor] = {}
        self._epoch_steps = 0

    def should_log(self, step: int, epoch_end: bool) -> bool:
        return step % self.log_every == 0 or epoch_end

    def update(self, scalars: dict[str, torch.Tensor]) -> None:
        """Add one step's scalars to the window and epoch sums (on the device, no sync)."""
        for sums in (self._window, self._epoch):
            for name, value in scalars.items():
                value = value.detach().float()
                sums[name] = sums[name] + value if name in sums else value.clone()
        self._window_steps += 1
        self._epoch_steps += 1

    def _means(self, sums: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
        """Means over steps and ranks, in one all-reduce and one host sync."""
        if not sums:
            return {}
        names = list(sums)
        stacked = torch.stack([sums[n] for n in names]) / max(1, steps)
        values = distributed.all_reduce_mean(stacked).tolist()
        return dict(zip(names, values, strict=True))

    def log(self, epoch: int, step: int, lr: float) -> dict[str, Any]:
        """Write the window's averages (every scalar, lr, images/s); a non-finite loss stops."""
        means = self._means(self._window, self._window_steps)
        elapsed = time.perf_counter() - self._window_start
        loss = means.get("loss", 0.0)
        if not math.isfinite(loss):
            raise RunError(
                f"loss is {loss} at step {step}; lower the learning rate or use --precision fp32"
            )
        record = {
            "epoch": epoch,
            "step": step,
            **means,
            "lr": lr,
            "images_per_s": self._window_steps * self.images_per_step / max(elapsed, 1e-9),
        }
        self.write(record, step)
        self._window.clear()
        self._window_steps = 0
        self._window_start = time.perf_counter()
        return record

    def end_epoch(self) -> dict[str, float]:
        """The epoch's averages as train_<name> (train_loss, train_contrast_top1, ...)."""
        means = self._means(self._epoch, self._epoch_steps)
        self._epoch.clear()
        self._epoch_steps = 0
        return {f"train_{name}": value for name, value in means.items()}

    def write(self, record: dict[str, Any], step: int) -> None:
        if not self.writer:
            return
        self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")  # type: ignore[union-attr]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                self.tb.add_scalar(key, value, step)  # type: ignore[union-attr]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
