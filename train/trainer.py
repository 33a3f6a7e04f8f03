"""The one training loop for every method, as a Trainer made of stateful parts.

After torchtitan's `train.py`: `Trainer.__init__` builds the components (data, method,
optimiser, scheduler, scaler, `TrainState`, `Checkpointer`, `MetricsLog`); `train_step` and
`fit` are short. Each component decides its own timing (`MetricsLog.should_log`,
`Checkpointer.should_save`); everything that resumes has state_dict/load_state_dict. The
loop knows nothing of MoCo: it reads the method's declarations and calls its hooks.
"""

from __future__ import annotations

import json
import math
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from mocoserve.core import tars
from mocoserve.core.errors import UserError
from mocoserve.train import distributed
from mocoserve.train.augment import (
    GeometricView,
    MultiView,
    color_augment_batch,
    recipe,
    train_views,
)
from mocoserve.train.checkpoint import Checkpointer, header, latest, load
from mocoserve.train.config import (
    IDENTITY_FIELDS,
    TrainConfig,
    flatten,
    get_field,
    load_yaml,
    save_yaml,
)
from mocoserve.train.configure import build_config, validate
from mocoserve.train.data import (
    DataIndex,
    EpochSampler,
    ImageDataset,
    ShardIndex,
    is_shards,
    make_loader,
    scan_data,
)
from mocoserve.train.evaluate import Evaluator
from mocoserve.train.methods import build_method, get_spec
from mocoserve.train.metrics import MetricsLog
from mocoserve.train.optim import build_optimizer
from mocoserve.train.stream import StreamDataset, StreamIndex, StreamPlan, scan_streams


@dataclass
class TrainState:
    """Where a run is: the epoch it is in, batches of it done, optimiser steps so far."""

    epoch: int = 0
    epoch_step: int = 0
    step: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.epoch_step, self.step = (
            int(state[k]) for k in ("epoch", "epoch_step", "step")
        )

    def finish_epoch(self) -> None:
        self.epoch += 1
        self.epoch_step = 0


@dataclass
class FitResult:
    out_dir: Path
    epoch: int  # epochs completed (the next epoch to run)
    step: int
    checkpoint: Path | None
    stopped: str | None = None  # None (finished), "preempted" or "max_steps"
    metrics: dict[str, Any] = field(default_factory=dict)


def prepare_config(
    method: str | None,
    preset: str | None,
    config_file: str | None,
    overrides: dict[str, Any],
    resume: str | None,
) -> tuple[TrainConfig, Path | None]:
    """Resolve the run's config and the checkpoint to resume from, if any.

    A resumed run keeps its checkpoint's config; options given now override it, except the
    fields that define the network (method, arch, head, queue), which must match.
    """
    explicit = {**(flatten(load_yaml(config_file)) if config_file else {}), **overrides}
    cfg = build_config(method, preset, config_file, overrides)
    ckpt_path: Path | None = None
    if resume == "auto":
        ckpt_path = latest(cfg.run.out)
    elif resume:
        ckpt_path = Path(resume)
    get_spec(cfg.method.name).cls.adopt_config(cfg, explicit)
    if ckpt_path is None:
        return cfg, None
    saved_cfg = TrainConfig.from_dict(load(ckpt_path)["config"])
    if method:
        explicit["method.name"] = method
    for key in IDENTITY_FIELDS:
        if key in explicit and get_field(saved_cfg, key) != get_field(cfg, key):
            raise UserError(
                f"{ckpt_path} was trained with {key}={get_field(saved_cfg, key)!r}, "
                f"not {get_field(cfg, key)!r}; it cannot be resumed with different {key}"
            )
    # options given now win; --max-steps and --quiet belong to this invocation only
    for key in [*explicit, "run.max_steps", "run.progress"]:
        if key not in IDENTITY_FIELDS:
            section, _, name = key.partition(".")
            setattr(getattr(saved_cfg, section), name, get_field(cfg, key))
    validate(saved_cfg)
    return saved_cfg, ckpt_path


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (cluster pre-emption) and Ctrl-C set a flag: save, then exit cleanly.

    A second Ctrl-C stops at once (KeyboardInterrupt), without waiting for the save.
    """

    def __init__(self) -> None:
        self.raised: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                    continue  # started with Ctrl-C ignored (a background job): keep it so
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and self.raised is not None:
            raise KeyboardInterrupt
        self.raised = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at `step`: linear warm-up, then cosine or step decay."""
    o = cfg.optim
    warmup = o.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if o.schedule == "cosine":
        total = max(1, o.epochs * steps_per_epoch - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / total)))
    epoch = step // max(1, steps_per_epoch)
    return 0.1 ** sum(epoch >= m for m in o.milestones)


def _average_bn_statistics(module: nn.Module) -> None:
    """Each DDP rank keeps its own BN running stats; average them before eval and saving."""
    if distributed.world_size() == 1:
        return
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            distributed.all_reduce_mean(m.running_mean)
            distributed.all_reduce_mean(m.running_var)


class Trainer:
    """Builds every component of a run from its config; `fit()` trains, `train_step` steps."""

    def __init__(
        self,
        cfg: TrainConfig,
        resume_from: Path | None = None,
        console: Console | None = None,
        preempt: PreemptionFlag | None = None,
    ) -> None:
        self.cfg = cfg
        self.console = console or Console(stderr=True, soft_wrap=True)  # whole lines in logs
        self.preempt = preempt or PreemptionFlag()
        self.resume_from = resume_from
        self.spec = get_spec(cfg.method.name)
        self.device = distributed.setup(cfg.run.device)
        self.main = distributed.is_main()
        self.out_dir = Path(cfg.run.out)
        self.train_index, self.val_index = self._scan()
        self.global_batch = cfg.optim.batch_size * distributed.world_size()
        if len(self.train_index) < self.global_batch:
            raise UserError(
                f"the global batch ({cfg.optim.batch_size} x {distributed.world_size()} "
                f"process(es) = {self.global_batch}) is larger than the dataset "
                f"({len(self.train_index)} images in {self.train_index.root})"
            )
        self.gpu_augment = cfg.data.gpu_augment and recipe(cfg.data.augmentation).has_colour
        self._set_backends()

        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.method = build_method(cfg, num_classes=len(self.train_index.classes))
        self.method.on_fit_start()
        self.method.to(self.device)
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)

        self.sampler: EpochSampler | StreamPlan
        if isinstance(self.train_index, StreamIndex):  # pipe: shards: read front to back
            d = cfg.data
            self.sampler = StreamPlan(
                self.train_index.counts,
                cfg.optim.batch_size,
                cfg.run.seed,
                d.resolved_workers(),
                d.shuffle_buffer,
            )
        else:
            self.sampler = EpochSampler(len(self.train_index), cfg.optim.batch_size, cfg.run.seed)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.lr = cfg.optim.lr * self.global_batch / cfg.optim.lr_batch
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(cfg.optim, self.method, self.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(cfg, s, self.steps_per_epoch)
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.device.type == "cuda" and cfg.run.precision == "fp16"
        )
        self.state = TrainState()
        self.checkpointer = Checkpointer(
            self.out_dir / "checkpoints",
            header(cfg.method.name, cfg, self.train_index.classes),
            {
                "model": self.method,
                "optimizer": self.optimizer,
                "scaler": self.scaler,
                "scheduler": self.scheduler,
                "train_state": self.state,
                "sampler": self.sampler,
            },
            cfg.run.save_every,
            cfg.run.save_minutes,
            writer=self.main,
            prepare=lambda: _average_bn_statistics(self.method),
        )
        if resume_from is not None:
            self._resume(resume_from)

        if cfg.run.compile:
            for name in self.method.compile_targets:
                getattr(self.method, name).compile()
        self.model: nn.Module = self.method
        if distributed.is_distributed():
            self.model = distributed.ddp_wrap(self.method, self.device)
        self.loader = self._train_loader()

        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, self.out_dir / "config.yaml")
            self._print_summary()
        self.metrics = MetricsLog(
            self.out_dir, cfg.run.log_every, self.global_batch, self.device, writer=self.main
        )
        self.evaluator = (
            Evaluator(
                cfg, self.device, self.train_index, self.val_index, self._autocast, self._to_device
            )
            if self.val_index is not None
            else None
        )

    # set-up
    @property
    def channels_last(self) -> bool:
        return self.device.type == "cuda" and self.cfg.run.channels_last

    def _scan(self) -> tuple[DataIndex | StreamIndex, DataIndex | None]:
        d = self.cfg.data
        shards = tars.expand([d.root]) if is_shards(d.root) else []
        train_index: DataIndex | StreamIndex
        if any(s.startswith(tars.PIPE) for s in shards):
            if d.val and self.spec.cls.trains_encoder:
                raise UserError(
                    "--val: the k-NN monitor searches the training images by offset, and pipe: "
                    "shards have none; drop --val and run mocoserve knn on the exported package"
                )
            train_index = scan_streams(
                d.root,
                shards,
                self.out_dir,
                d.label_key,
                d.stream_timeout,
                d.shard_counts,
                stop=lambda: self.preempt.raised,
            )
        else:
            train_index = scan_data(d.root, label_key=d.label_key)
        val_index = None
        if d.val:
            classes = train_index.classes if train_index.labelled else None
            val_index = scan_data(d.val, classes, d.label_key if is_shards(d.val) else None)
            if not val_index.labelled:
                raise UserError(
                    f"--val {d.val} must be a labelled folder (class/image) or labelled shards"
                )
        if self.spec.cls.needs_labels and not train_index.labelled:
            if isinstance(train_index, StreamIndex) and self.cfg.data.shard_counts:
                raise UserError(
                    f"{self.spec.name} needs labels, but data.shard_counts "
                    f"({self.cfg.data.shard_counts}) lists no class names; drop it to collect "
                    "them by streaming"
                )
            if isinstance(train_index, ShardIndex | StreamIndex):
                raise UserError(
                    f"{self.spec.name} needs labels, but {train_index.unlabelled} of "
                    f"{len(train_index)} samples of {train_index.root} have none (a json "
                    "label, a cls part, or the json field --label-key names)"
                )
            raise UserError(
                f"{self.spec.name} needs labels, but {train_index.root} is not laid out as "
                "class/image (every image inside a class subfolder)"
            )
        return train_index, val_index

    def _set_backends(self) -> None:
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _resume(self, path: Path) -> None:
        self.checkpointer.restore(path)
        skip, note = self.sampler.resume_position(self.state.epoch_step)
        self.state.epoch_step = skip
        if self.main:
            s = self.state
            where = f"epoch {s.epoch + 1}" + (f", batch {s.epoch_step}" if s.epoch_step else "")
            self.console.print(f"resuming from {path} at {where} (step {s.step})")
            if note:
                self.console.print(f"note: {note}")

    def _train_loader(self) -> torch.utils.data.DataLoader:
        cfg = self.cfg
        views = [GeometricView(cfg.data)] if self.gpu_augment else train_views(cfg.data)
        transform = MultiView(views, self.method.num_views)
        if isinstance(self.sampler, StreamPlan):
            assert isinstance(self.train_index, StreamIndex)
            streamed = StreamDataset(
                self.train_index, self.sampler, transform, cfg.data.stream_timeout
            )
            return make_loader(
                streamed,
                None,
                cfg.optim.batch_size,
                self.sampler.loader_workers,
                pin_memory=self.device.type == "cuda",
                drop_last=True,
                persistent=False,  # each epoch's workers are made with its epoch and position
            )
        dataset = ImageDataset(
            self.train_index.files,
            self.train_index.labels,
            transform,
            cfg.run.seed,
        )
        return make_loader(
            dataset,
            self.sampler,
            cfg.optim.batch_size,
            cfg.data.resolved_workers(),
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent=True,
        )

    def _print_summary(self) -> None:
        idx, cfg = self.train_index, self.cfg
        self.console.print(
            f"{self.spec.name} · {cfg.model.arch} · {len(idx)} images"
            + (f" in {len(idx.classes)} classes" if idx.labelled else "")
            + f" · {distributed.world_size()} process(es) on {self.device.type} · batch "
            f"{cfg.optim.batch_size}/process, global {self.global_batch} · "
            f"{cfg.optim.optimizer} lr {self.lr:g} · {self.steps_per_epoch} steps/epoch"
        )
        for note in self.method.notes:  # e.g. shuffled BN asked for on a net without BN
            self.console.print(f"note: {note}")

    # device helpers
    def _autocast(self) -> torch.autocast:
        enabled = self.device.type == "cuda" and self.cfg.run.precision != "fp32"
        dtype = torch.float16 if self.cfg.run.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return x.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return x.to(self.device, non_blocking=True)

    def _views_to_device(self, views: list) -> list[torch.Tensor]:
        """A batch's views on the device, normalised; with gpu_augment, colour-augmented there."""
        if not self.gpu_augment:
            return [self._to_device(v) for v in views]
        d = self.cfg.data
        out = []
        for images, params in views:  # uint8 B x 3 x H x W (4x less to copy), B x 6
            x = color_augment_batch(
                images.to(self.device, non_blocking=True),
                params.to(self.device, non_blocking=True),
                tuple(d.mean),
                tuple(d.std),
                recipe(d.augmentation),
            )
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(x)
        return out

    # the loop
    def train_step(self, batch: tuple[list, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimiser step on a batch; the method's scalars, detached, still on the device."""
        images, labels = batch
        views = self._views_to_device(images)
        labels = labels.to(self.device, non_blocking=True)
        self.method.on_train_step(self.state.step, self.total_steps)
        with self._autocast():
            out = self.model(views, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.state.step += 1
        self.state.epoch_step += 1
        return {name: value.detach() for name, value in out.items()}

    def fit(self) -> FitResult:
        """Train to cfg.optim.epochs, or until --max-steps or a pre-emption signal."""
        s, epochs = self.state, self.cfg.optim.epochs
        if s.epoch >= epochs:
            if self.main:
                self.console.print(f"already trained for {s.epoch} epochs; nothing to do")
            return FitResult(self.out_dir, s.epoch, s.step, self.resume_from)
        self.checkpointer.resume_rng()
        self.model.train()
        stopped, path, metrics = None, None, {}
        with self._progress() as progress:
            while s.epoch < epochs and stopped is None:
                stopped = self.train_epoch(progress)
                if stopped is None:
                    metrics = self.end_epoch()
                    final = s.epoch == epochs
                    keep = s.epoch if self.checkpointer.keeps(s.epoch, final) else None
                    path = self.checkpointer.save(metrics, keep)
                else:
                    path = self.checkpointer.save(metrics)
        if stopped is None:
            self.method.on_fit_end()
            if self.main and self.method.report_file:
                report = self.out_dir / self.method.report_file
                report.write_text(json.dumps(metrics, indent=2) + "\n")
        if self.main and stopped == "preempted":
            self.console.print(
                f"received {self.preempt.raised}: saved {path}; resume with --resume auto"
            )
        return FitResult(self.out_dir, s.epoch, s.step, path, stopped, metrics)

    def train_epoch(self, progress: Progress) -> str | None:
        """Run the rest of the current epoch; why it stopped early ("max_steps", "preempted")."""
        s = self.state
        self.sampler.set_epoch(s.epoch, s.epoch_step)
        task = progress.add_task(
            f"epoch {s.epoch + 1}/{self.cfg.optim.epochs}",
            total=self.steps_per_epoch,
            completed=s.epoch_step,
            stats="",
        )
        for batch in self.loader:
            self.metrics.update(self.train_step(batch))
            progress.advance(task)
            epoch_end = s.epoch_step == self.steps_per_epoch
            at_log = self.metrics.should_log(s.step, epoch_end)
            if at_log:
                record = self.metrics.log(s.epoch + 1, s.step, self.optimizer.param_groups[0]["lr"])
                progress.update(task, stats=_stats(record))
            stopped = self._should_stop(at_log)
            if stopped:
                if epoch_end:
                    s.finish_epoch()
                return stopped
            if self.checkpointer.should_save(at_log, self.device):
                self.checkpointer.save()
        return None

    def end_epoch(self) -> dict[str, Any]:
        """The epoch's figures (mean scalars, evaluation when due), logged and printed."""
        s = self.state
        s.finish_epoch()
        metrics: dict[str, Any] = {"epoch": s.epoch, "step": s.step, **self.metrics.end_epoch()}
        if self.evaluator is not None and (
            s.epoch == self.cfg.optim.epochs or s.epoch % self.cfg.run.knn_every == 0
        ):
            metrics.update(self.evaluate())
        self.metrics.write(metrics, s.step)
        if self.main:
            self.console.print(
                "  ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in metrics.items()
                )
            )
        return metrics

    def evaluate(self) -> dict[str, float]:
        """The method's own figures on the val folder (k-NN monitor, or probe accuracy)."""
        assert self.evaluator is not None
        _average_bn_statistics(self.method)
        self.method.eval()
        try:
            return self.method.evaluate(self.evaluator)
        finally:
            self.method.train()

    def _should_stop(self, at_log: bool) -> str | None:
        max_steps = self.cfg.run.max_steps
        if max_steps is not None and self.state.step >= max_steps:
            return "max_steps"
        # one process stops at once; ranks agree at log steps, so all stop at the same step
        if not distributed.is_distributed():
            return "preempted" if self.preempt.raised else None
        flag = self.preempt.raised is not None
        return "preempted" if at_log and distributed.any_rank(flag, self.device) else None

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=self.console,
            # to a file or a pipe the bar would only be copied out at the end, beside the
            # epoch lines that end_epoch prints: there, those lines are the whole log
            disable=not (self.main and self.cfg.run.progress and self.console.is_terminal),
            transient=False,
        )

    def close(self) -> None:
        """Stop the data workers and close the logs (also after an error: no process left)."""
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()
        loader = getattr(self, "loader", None)
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
            loader._iterator = None  # type: ignore[union-attr]


def _stats(record: dict[str, Any]) -> str:
    parts = [f"loss {record['loss']:.4f}"]
    if "contrast_top1" in record:
        parts.append(f"acc@1 {record['contrast_top1']:.1f}%")
    parts.append(f"lr {record['lr']:.4g}")
    parts.append(f"{record['images_per_s']:.0f} img/s")
    return "  ".join(parts)


def fit(
    cfg: TrainConfig, resume_from: Path | None = None, console: Console | None = None
) -> FitResult:
    """Train `cfg.method` on `cfg.data.root`; resume from a checkpoint if given.

    SIGTERM/SIGUSR1/Ctrl-C at any point (even during set-up) end the run with a checkpoint.
    """
    with PreemptionFlag() as preempt:
        trainer = None
        try:
            trainer = Trainer(cfg, resume_from, console, preempt)
            return trainer.fit()
        finally:
            if trainer is not None:
                trainer.close()
