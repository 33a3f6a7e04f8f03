"""Typed training configuration: one small dataclass per component, combined in `TrainConfig`.

Precedence, lowest first: the method's paper defaults, a preset, a YAML file, CLI options.
The resolved config is written to `config.yaml` and saved inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mocoserve.core.errors import UserError

METHODS = ("moco-v1", "moco-v2", "supcon", "supcon-queue", "linear")
PRESETS = ("cifar",)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    root: str = ""
    val: str | None = None  # labelled folder for the k-NN monitor / linear-probe evaluation
    image_size: int = 224
    eval_resize: int | None = None  # shorter side before the centre crop; None: size * 256/224
    augmentation: str = "moco-v2"  # moco-v1 | moco-v2 | supcon | linear
    blur: bool = True  # Gaussian blur in the moco-v2/supcon recipes (off for tiny images)
    hflip: bool = True  # off where mirroring changes meaning (digits, text)
    min_crop_scale: float = 0.2  # RandomResizedCrop's smallest area fraction
    gpu_augment: bool = False  # workers crop/flip only; colour jitter, gray, blur on the device
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    workers: int = 4

    def resolved_eval_resize(self) -> int:
        if self.eval_resize is not None:
            return self.eval_resize
        return self.image_size if self.image_size <= 64 else round(self.image_size * 256 / 224)


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    small_stem: bool = False  # 3x3 stride-1 stem and no max-pool, for 32-96 px images
    head: str = "mlp"  # linear | mlp (projection head on top of the backbone)
    dim: int = 128  # embedding dim of the head
    hidden_dim: int | None = None  # MLP hidden width; None: the backbone's feature dim
    bn_splits: int = 1  # split BatchNorm in one process (simulates multi-GPU BN statistics)


@dataclass
class MethodConfig:
    name: str = "moco-v2"
    temperature: float = 0.2
    queue_size: int = 65536
    momentum: float = 0.999  # momentum encoder update, m in the MoCo paper's eq. (2)
    shuffle_bn: bool = True
    base_temperature: float = 0.07  # SupCon only
    contrast_mode: str = "all"  # SupCon only: all | one
    pretrained: str | None = None  # linear probe only: the pretraining checkpoint


@dataclass
class OptimConfig:
    epochs: int = 200
    batch_size: int = 256  # per process; the global batch is this times the world size
    lr: float = 0.03  # at `lr_batch` images per step; scaled linearly with the global batch
    lr_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | step
    milestones: list[int] = field(default_factory=lambda: [120, 160])  # step schedule, x0.1
    warmup_epochs: int = 0


@dataclass
class RunConfig:
    out: str = "runs/train"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "bf16"  # bf16 | fp16 | fp32 (CUDA only; the CPU trains in fp32)
    channels_last: bool = True
    compile: bool = False
    save_every: int = 10  # epochs between kept epoch_NNNN.pt checkpoints
    save_minutes: float = 30.0  # also refresh last.pt mid-epoch at this interval
    knn_every: int = 10  # epochs between k-NN monitor runs (needs data.val)
    knn_k: int = 200
    knn_temperature: float = 0.1
    log_every: int = 20  # steps between logged metrics
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps
    progress: bool = True


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        cfg = cls()
        apply_overrides(cfg, flatten(d), source="config")
        return cfg


def _plain(obj: Any) -> Any:
    """Tuples to lists, so the dict round-trips through YAML and torch.load(weights_only)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def method_defaults(method: str) -> TrainConfig:
    """The paper defaults of a method: MoCo v1/v2, SupCon, SupCon with a memory, lincls."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    cfg = TrainConfig()
    cfg.method.name = method
    if method == "moco-v1":  # He et al. 2020: linear head, T=0.07, step lr at 120/160
        cfg.model.head = "linear"
        cfg.method.temperature = 0.07
        cfg.optim.schedule = "step"
        cfg.data.augmentation = "moco-v1"
    elif method == "moco-v2":  # Chen et al. 2020: MLP head, T=0.2, aug+, cosine
        pass
    elif method == "supcon":  # Khosla et al. 2020 (SupContrast repo): T=0.07, lr 0.05/256
        cfg.method.temperature = 0.07
        cfg.method.queue_size = 0
        cfg.optim.lr = 0.05
        cfg.data.augmentation = "supcon"
    elif method == "supcon-queue":  # SupCon's ImageNet setup: MoCo-style memory of 8192
        cfg.method.temperature = 0.07
        cfg.method.queue_size = 8192
        cfg.data.augmentation = "supcon"
    elif method == "linear":  # MoCo lincls: frozen backbone, lr 30, no wd, steps at 60/80
        cfg.method.queue_size = 0
        cfg.optim.epochs = 100
        cfg.optim.lr = 30.0
        cfg.optim.weight_decay = 0.0
        cfg.optim.schedule = "step"
        cfg.optim.milestones = [60, 80]
        cfg.data.augmentation = "linear"
    return cfg


def apply_preset(cfg: TrainConfig, preset: str) -> None:
    """Small-image preset, after the MoCo CIFAR-10 demo (batch 512, lr 0.06, 8 BN splits)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg.model.arch = "resnet18"
    cfg.model.small_stem = True
    cfg.model.bn_splits = 8
    cfg.data.image_size = 32
    cfg.data.blur = False
    cfg.optim.lr = 0.06 if cfg.method.name != "linear" else cfg.optim.lr
    cfg.optim.lr_batch = 512
    cfg.optim.batch_size = 512 if cfg.method.name != "linear" else 256
    cfg.optim.weight_decay = 5e-4 if cfg.method.name != "linear" else 0.0
    if cfg.method.name in ("moco-v1", "moco-v2", "supcon-queue"):
        cfg.method.queue_size = 4096
        cfg.method.momentum = 0.99
        cfg.method.temperature = 0.1


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], source: str = "option") -> None:
    """Set dotted fields (`optim.lr`), converting to each field's type; unknown keys are errors."""
    for key, value in overrides.items():
        section_name, _, field_name = key.partition(".")
        section = getattr(cfg, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            raise UserError(f"unknown {source} key {key!r}")
        if not field_name:
            raise UserError(f"{source} section {key!r} must be a mapping of its fields")
        fields = {f.name: f for f in dataclasses.fields(section)}
        if field_name not in fields:
            raise UserError(f"unknown {source} key {key!r}")
        current = getattr(section, field_name)
        setattr(section, field_name, _coerce(value, current, key))


def _coerce(value: Any, current: Any, key: str) -> Any:
    if value is None or current is None:
        return value
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            return tuple(float(v) for v in value)
        if isinstance(current, list):
            return [int(v) for v in value]
    except (TypeError, ValueError) as e:
        raise UserError(f"{key}: cannot use {value!r} ({e})") from None
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of sections (data, model, method, optim, run)")
    return data


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def build_config(
    method: str | None = None,
    preset: str | None = None,
    yaml_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Paper defaults of the method, then the preset, the YAML file and the explicit overrides.

    The method is `method` if given, else the YAML file's `method.name`, else moco-v2.
    """
    from_file = flatten(load_yaml(yaml_file)) if yaml_file else {}
    chosen = method or str(from_file.get("method.name") or "moco-v2")
    cfg = method_defaults(chosen)
    if preset:
        apply_preset(cfg, preset)
    apply_overrides(cfg, from_file, source="config")
    apply_overrides(cfg, {**(overrides or {}), "method.name": chosen})
    validate(cfg)
    return cfg


# Fields that define the network and its state; a checkpoint resumes only under the same ones.
IDENTITY_FIELDS = (
    "method.name",
    "model.arch",
    "model.small_stem",
    "model.head",
    "model.dim",
    "model.hidden_dim",
    "method.queue_size",
)


def get_field(cfg: TrainConfig, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def validate(cfg: TrainConfig) -> None:
    """Reject inconsistent settings with one clear message each."""
    o, m, mo, d = cfg.optim, cfg.method, cfg.model, cfg.data
    checks = [
        (o.epochs >= 1, f"--epochs must be at least 1, got {o.epochs}"),
        (o.batch_size >= 1, f"--batch-size must be at least 1, got {o.batch_size}"),
        (o.lr > 0, f"learning rate must be positive, got {o.lr}"),
        (m.temperature > 0, f"temperature must be positive, got {m.temperature}"),
        (0.0 <= m.momentum < 1.0, f"momentum must be in [0, 1), got {m.momentum}"),
        (m.queue_size >= 0, f"--queue-size must be >= 0, got {m.queue_size}"),
        (
            m.name not in ("moco-v1", "moco-v2", "supcon-queue") or m.queue_size >= 1,
            f"{m.name} needs a queue: --queue-size must be at least 1",
        ),
        (m.contrast_mode in ("all", "one"), "contrast_mode must be 'all' or 'one'"),
        (mo.head in ("linear", "mlp"), f"model.head must be 'linear' or 'mlp', got {mo.head!r}"),
        (mo.bn_splits >= 1, f"--bn-splits must be at least 1, got {mo.bn_splits}"),
        (
            o.batch_size % mo.bn_splits == 0,
            f"--batch-size {o.batch_size} is not divisible by --bn-splits {mo.bn_splits}",
        ),
        (d.image_size >= 16, f"image size must be at least 16 px, got {d.image_size}"),
        (d.workers >= 0, f"--workers must be >= 0, got {d.workers}"),
        (o.schedule in ("cosine", "step"), f"schedule must be cosine or step, got {o.schedule!r}"),
        (cfg.run.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
        (cfg.run.precision in ("bf16", "fp16", "fp32"), "precision must be bf16, fp16 or fp32"),
        (cfg.run.save_every >= 1, "save_every must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if m.name == "linear" and not m.pretrained:
        raise UserError("the linear probe needs --pretrained CHECKPOINT (a pretraining checkpoint)")
