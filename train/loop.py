"""The one training loop, for every method: data, AMP, DDP, checkpoints, pre-emption, metrics."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from mocoserve.train import checkpoint, distributed
from mocoserve.train.augment import (
    GeometricView,
    MultiView,
    color_augment_batch,
    eval_transform,
    train_transform,
)
from mocoserve.train.config import (
    IDENTITY_FIELDS,
    TrainConfig,
    build_config,
    flatten,
    get_field,
    load_yaml,
    save_yaml,
    validate,
)
from mocoserve.train.data import (
    EpochSampler,
    FolderIndex,
    ImageDataset,
    ShardSampler,
    make_loader,
    scan_folder,
)
from mocoserve.train.knn import topk_accuracy, weighted_knn_scores
from mocoserve.train.methods import LinearProbe, build_method
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from mocoserve.core.errors import UserError


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
    explicit = _explicit(config_file, overrides)
    cfg = build_config(method, preset, config_file, overrides)
    ckpt_path: Path | None = None
    if resume == "auto":
        ckpt_path = checkpoint.latest(cfg.run.out)
    elif resume:
        ckpt_path = Path(resume)
    if cfg.method.name == "linear":
        _adopt_pretrained_model(cfg, explicit)
    if ckpt_path is None:
        return cfg, None
    saved = checkpoint.load(ckpt_path)
    saved_cfg = TrainConfig.from_dict(saved["config"])
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


def _explicit(config_file: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    return {**(flatten(load_yaml(config_file)) if config_file else {}), **overrides}


def _adopt_pretrained_model(cfg: TrainConfig, explicit: dict[str, Any]) -> None:
    """The linear probe's network is the pretraining checkpoint's; so are its image settings."""
    pre = checkpoint.load(cfg.method.pretrained)  # type: ignore[arg-type]
    pre_cfg = TrainConfig.from_dict(pre["config"])
    if pre_cfg.method.name == "linear":
        raise UserError(
            f"{cfg.method.pretrained} is a linear-probe checkpoint, not a pretraining one"
        )
    for key in ("model.arch", "model.small_stem", "model.head", "model.dim", "model.hidden_dim"):
        if key in explicit and explicit[key] != get_field(pre_cfg, key):
            raise UserError(
                f"{cfg.method.pretrained} holds a {key.split('.')[1]}={get_field(pre_cfg, key)!r} "
                f"network, not {explicit[key]!r}"
            )
    cfg.model = pre_cfg.model
    cfg.model.bn_splits = 1  # the backbone runs in eval mode
    for key in ("data.image_size", "data.eval_resize", "data.mean", "data.std"):
        if key not in explicit:
            setattr(cfg.data, key.partition(".")[2], get_field(pre_cfg, key))


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (cluster pre-emption) set a flag; the loop saves and exits cleanly."""

    def __init__(self) -> None:
        self.raised: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
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


class MetricsLog:
    """metrics.jsonl and TensorBoard, written by rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.tb = None
        if enabled:
            self.file = open(out_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))

    def write(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                self.tb.add_scalar(key, value, step)  # type: ignore[union-attr]

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()  # type: ignore[union-attr]


@torch.no_grad()
def _run_eval(
    fn: Any, index: FolderIndex, cfg: TrainConfig, device: torch.device, batch_size: int
) -> torch.Tensor:
    """fn over every image of `index` (eval transform), sharded over ranks, gathered in order."""
    dataset = ImageDataset(index.files, index.labels, eval_transform(cfg.data), cfg.run.seed)
    loader = make_loader(
        dataset,
        ShardSampler(len(index)),
        batch_size,
        cfg.data.workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
        persistent=False,
    )
    outputs = []
    for images, _ in loader:
        images = _to_device(images, device, cfg)
        with _autocast(device, cfg):
            outputs.append(fn(images).float())
    local = torch.cat(outputs)  # per_rank x D
    world = distributed.world_size()
    gathered = distributed.all_gather(local)  # (W * per_rank) x D, rank-major
    per_rank = local.shape[0]
    return (
        gathered.view(world, per_rank, -1)
        .transpose(0, 1)
        .reshape(world * per_rank, -1)[: len(index)]
    )


def evaluate(
    method: nn.Module,
    cfg: TrainConfig,
    train_index: FolderIndex,
    val_index: FolderIndex,
    device: torch.device,
) -> dict[str, float]:
    """Linear probe: val top-1/top-5. Pretraining: weighted k-NN top-1/top-5 on the val folder."""
    method.eval()
    batch = max(cfg.optim.batch_size, 64)
    val_labels = torch.tensor(val_index.labels, device=device)
    try:
        if isinstance(method, LinearProbe):
            logits = _run_eval(method.logits, val_index, cfg, device, batch)
            acc = topk_accuracy(logits, val_labels)
            return {"val_top1": acc["top1"], "val_top5": acc["top5"]}
        encoder = method.query_encoder

        def features(x: torch.Tensor) -> torch.Tensor:
            return F.normalize(encoder.features(x).float(), dim=1)

        val_features = _run_eval(features, val_index, cfg, device, batch)
        num_classes = len(val_index.classes)
        if train_index.labelled:
            bank = _run_eval(features, train_index, cfg, device, batch)
            bank_labels = torch.tensor(train_index.labels, device=device)
            scores = weighted_knn_scores(
                bank, bank_labels, val_features, num_classes, cfg.run.knn_k, cfg.run.knn_temperature
            )
        else:  # unlabelled training data: leave-one-out k-NN within the val folder
            scores = weighted_knn_scores(
                val_features,
                val_labels,
                val_features,
                num_classes,
                cfg.run.knn_k,
                cfg.run.knn_temperature,
                exclude_self=True,
            )
        acc = topk_accuracy(scores, val_labels)
        return {"knn_top1": acc["top1"], "knn_top5": acc["top5"]}
    finally:
        method.train()


def _autocast(device: torch.device, cfg: TrainConfig) -> torch.autocast:
    enabled = device.type == "cuda" and cfg.run.precision != "fp32"
    dtype = torch.float16 if cfg.run.precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def _to_device(x: torch.Tensor, device: torch.device, cfg: TrainConfig) -> torch.Tensor:
    if device.type == "cuda" and cfg.run.channels_last:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


def _uses_gpu_augment(cfg: TrainConfig) -> bool:
    return cfg.data.gpu_augment and cfg.data.augmentation != "linear"


def _views_to_device(views: list, device: torch.device, cfg: TrainConfig) -> list[torch.Tensor]:
    """A batch's views on the device, normalised; with gpu_augment, colour-augmented there."""
    if not _uses_gpu_augment(cfg):
        return [_to_device(v, device, cfg) for v in views]
    out = []
    for images, params in views:  # uint8 B x 3 x H x W (4x less to copy), B x 6
        x = color_augment_batch(
            images.to(device, non_blocking=True),
            params.to(device, non_blocking=True),
            tuple(cfg.data.mean),
            tuple(cfg.data.std),
        )
        if device.type == "cuda" and cfg.run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(x)
    return out


def _average_bn_statistics(module: nn.Module) -> None:
    """Each DDP rank keeps its own BN running stats; average them before eval and saving."""
    if distributed.world_size() == 1:
        return
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            distributed.all_reduce_mean(m.running_mean)
            distributed.all_reduce_mean(m.running_var)


def fit(
    cfg: TrainConfig, resume_from: Path | None = None, console: Console | None = None
) -> FitResult:
    """Train `cfg.method` on `cfg.data.root`; resume from a checkpoint if given.

    SIGTERM/SIGUSR1 at any point (even during set-up) end the run with a checkpoint.
    """
    with PreemptionFlag() as preempt:
        return _fit(cfg, resume_from, console or Console(stderr=True), preempt)


def _fit(
    cfg: TrainConfig, resume_from: Path | None, console: Console, preempt: PreemptionFlag
) -> FitResult:
    device = distributed.setup(cfg.run.device)
    main = distributed.is_main()
    world = distributed.world_size()
    out_dir = Path(cfg.run.out)

    train_index = scan_folder(cfg.data.root)
    val_index = (
        scan_folder(cfg.data.val, train_index.classes if train_index.labelled else None)
        if cfg.data.val
        else None
    )
    if val_index is not None and not val_index.labelled:
        raise UserError(f"--val {cfg.data.val} must be a labelled folder (class/image)")
    method_name = cfg.method.name
    if method_name in ("supcon", "supcon-queue", "linear") and not train_index.labelled:
        raise UserError(
            f"{method_name} needs labels, but {train_index.root} is not laid out as class/image "
            "(every image inside a class subfolder)"
        )
    global_batch = cfg.optim.batch_size * world
    if len(train_index) < global_batch:
        raise UserError(
            f"the global batch ({cfg.optim.batch_size} x {world} process(es) = {global_batch}) "
            f"is larger than the dataset ({len(train_index)} images in {train_index.root})"
        )

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    method = build_method(cfg, num_classes=len(train_index.classes))
    pretrained_backbone: dict[str, torch.Tensor] | None = None
    if isinstance(method, LinearProbe):
        pretrained_backbone = _load_pretrained(method, cfg)

    method.to(device)
    if device.type == "cuda" and cfg.run.channels_last:
        method.to(memory_format=torch.channels_last)

    sampler = EpochSampler(len(train_index), cfg.optim.batch_size, cfg.run.seed)
    steps_per_epoch = sampler.batches_per_epoch
    lr = cfg.optim.lr * global_batch / cfg.optim.lr_batch
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg, s, steps_per_epoch)
    )
    scaler = torch.amp.GradScaler(
        device.type, enabled=device.type == "cuda" and cfg.run.precision == "fp16"
    )

    start_epoch, step, epoch_step = 0, 0, 0
    rng_to_restore = None
    if resume_from is not None:
        # on the CPU: load_state_dict moves weights and optimiser state to their parameters'
        # device, and the RNG states must stay CPU tensors for set_rng_state
        saved = checkpoint.load(resume_from)
        method.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        scheduler.load_state_dict(saved["scheduler"])
        start_epoch, step, epoch_step = saved["epoch"], saved["step"], saved["epoch_step"]
        rng_to_restore = saved["rng"]
        if main:
            where = (
                f"epoch {start_epoch + 1}, batch {epoch_step}"
                if epoch_step
                else f"epoch {start_epoch + 1}"
            )
            console.print(f"resuming from {resume_from} at {where} (step {step})")

    if cfg.run.compile:
        for name in ("query_encoder", "key_encoder"):
            if hasattr(method, name):
                getattr(method, name).compile()
    model: nn.Module = method
    if distributed.is_distributed():
        model = distributed.ddp_wrap(method, device)

    views = method.num_views
    dataset = ImageDataset(
        train_index.files,
        train_index.labels,
        MultiView(
            GeometricView(cfg.data) if _uses_gpu_augment(cfg) else train_transform(cfg.data),
            views,
        ),
        cfg.run.seed,
    )
    loader = make_loader(
        dataset,
        sampler,
        cfg.optim.batch_size,
        cfg.data.workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent=True,
    )

    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out_dir / "config.yaml")
        console.print(
            f"{method_name} · {cfg.model.arch} · {len(train_index)} images"
            + (f" in {len(train_index.classes)} classes" if train_index.labelled else "")
            + f" · {world} process(es) on {device.type} · batch {cfg.optim.batch_size}/process, "
            f"global {global_batch} · lr {lr:g} · {steps_per_epoch} steps/epoch"
        )
    log = MetricsLog(out_dir, enabled=main)

    def save(epoch: int, in_epoch: int, metrics: dict[str, Any], keep: bool) -> Path | None:
        _average_bn_statistics(method)
        if not main:
            return None
        state = {
            **checkpoint.model_state(method_name, cfg, method, epoch, in_epoch, step),
            "classes": train_index.classes,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": checkpoint.rng_state(),
            "metrics": metrics,
        }
        last = out_dir / "checkpoints" / "last.pt"
        checkpoint.save_atomic(state, last)
        if keep:
            kept = out_dir / "checkpoints" / f"epoch_{epoch:04d}.pt"
            tmp = kept.with_suffix(".pt.tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(last, tmp)  # the same bytes as last.pt, without writing them twice
            except OSError:
                checkpoint.save_atomic(state, tmp)
            os.replace(tmp, kept)
            return kept
        return last

    if start_epoch >= cfg.optim.epochs:
        if main:
            console.print(f"already trained for {start_epoch} epochs; nothing to do")
        log.close()
        return FitResult(out_dir, start_epoch, step, resume_from)

    if rng_to_restore is not None:
        checkpoint.set_rng_state(rng_to_restore)

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not (main and cfg.run.progress),
        transient=False,
    )
    metrics: dict[str, Any] = {}
    stopped: str | None = None
    last_path: Path | None = None
    last_save = time.monotonic()
    model.train()
    with progress:
        for epoch in range(start_epoch, cfg.optim.epochs):
            skip = epoch_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch, skip)
            task = progress.add_task(
                f"epoch {epoch + 1}/{cfg.optim.epochs}",
                total=steps_per_epoch,
                completed=skip,
                loss="-",
                lr="-",
                ips="-",
            )
            epoch_loss = torch.zeros((), device=device)
            window_loss = torch.zeros((), device=device)
            window_steps, epoch_steps = 0, 0
            window_start = time.perf_counter()
            in_epoch = skip
            for images, labels in loader:
                images = _views_to_device(images, device, cfg)
                labels = labels.to(device, non_blocking=True)
                with _autocast(device, cfg):
                    loss = model(images, labels)["loss"]
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                in_epoch += 1
                window_steps += 1
                epoch_steps += 1
                window_loss += loss.detach()
                epoch_loss += loss.detach()
                progress.advance(task)

                at_log = step % cfg.run.log_every == 0 or in_epoch == steps_per_epoch
                if at_log:
                    avg = (distributed.all_reduce_mean(window_loss.clone()) / window_steps).item()
                    if not math.isfinite(avg):
                        raise FloatingPointError(
                            f"loss is {avg} at step {step}; lower the learning rate or use fp32"
                        )
                    elapsed = time.perf_counter() - window_start
                    ips = window_steps * global_batch / max(elapsed, 1e-9)
                    current_lr = optimizer.param_groups[0]["lr"]
                    progress.update(
                        task, loss=f"{avg:.4f}", lr=f"{current_lr:.4g}", ips=f"{ips:.0f}"
                    )
                    log.write(
                        {
                            "epoch": epoch + 1,
                            "step": step,
                            "loss": avg,
                            "lr": current_lr,
                            "images_per_s": ips,
                        },
                        step,
                    )
                    window_loss.zero_()
                    window_steps = 0
                    window_start = time.perf_counter()

                if cfg.run.max_steps is not None and step >= cfg.run.max_steps:
                    stopped = "max_steps"
                elif _preempted(preempt, at_log, device):
                    stopped = "preempted"
                if stopped:
                    done_epoch = in_epoch == steps_per_epoch
                    last_path = save(
                        epoch + done_epoch, 0 if done_epoch else in_epoch, metrics, False
                    )
                    break
                due = time.monotonic() - last_save > cfg.run.save_minutes * 60
                if at_log and distributed.any_rank(due and main, device):
                    save(epoch, in_epoch, metrics, False)
                    last_save = time.monotonic()
            if stopped:
                break

            metrics = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": (
                    distributed.all_reduce_mean(epoch_loss) / max(1, epoch_steps)
                ).item(),
            }
            final = epoch + 1 == cfg.optim.epochs
            if val_index is not None and (final or (epoch + 1) % cfg.run.knn_every == 0):
                _average_bn_statistics(method)
                metrics.update(evaluate(method, cfg, train_index, val_index, device))
            log.write(metrics, step)
            if main:
                console.print(
                    "  ".join(
                        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in metrics.items()
                    )
                )
            keep = final or (epoch + 1) % cfg.run.save_every == 0
            last_path = save(epoch + 1, 0, metrics, keep)
            last_save = time.monotonic()

    if pretrained_backbone is not None and stopped is None:
        _check_backbone_unchanged(method, pretrained_backbone)
        if main:
            (out_dir / "lincls.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.close()
    if main and stopped == "preempted":
        console.print(f"received {preempt.raised}: saved {last_path}; resume with --resume auto")
    return FitResult(
        out_dir,
        epoch + (stopped is None),
        step,
        last_path,
        stopped,
        metrics,
    )


def _preempted(preempt: PreemptionFlag, at_log: bool, device: torch.device) -> bool:
    """One process stops at once; ranks agree at log steps, so all stop at the same step."""
    if not distributed.is_distributed():
        return preempt.raised is not None
    return at_log and distributed.any_rank(preempt.raised is not None, device)


def _load_pretrained(method: LinearProbe, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Copy the pretraining checkpoint's query encoder into the probe; return its backbone."""
    pre = checkpoint.load(cfg.method.pretrained)  # type: ignore[arg-type]
    try:
        method.query_encoder.load_state_dict(checkpoint.query_encoder_state(pre))
    except RuntimeError as e:
        raise UserError(f"{cfg.method.pretrained} does not fit a {cfg.model.arch}: {e}") from None
    return {k: v.clone() for k, v in method.query_encoder.backbone.state_dict().items()}


def _check_backbone_unchanged(method: LinearProbe, reference: dict[str, torch.Tensor]) -> None:
    """MoCo's lincls sanity check: the frozen backbone, BN statistics included, did not move."""
    for name, value in method.query_encoder.backbone.state_dict().items():
        if not torch.equal(value.cpu(), reference[name].cpu()):
            raise RuntimeError(f"linear probe changed the frozen backbone ({name})")
