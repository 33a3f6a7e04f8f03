"""Typed training configuration: one small dataclass per component, combined in `TrainConfig`.

Every value is converted by its field's type annotation and checked; a wrong type is a
one-line UserError. This module knows no method: `configure.build_config` resolves a run's
config (the method's paper defaults from the registry, a preset, a YAML file, options) and
checks it. The resolved config is written to `config.yaml` and saved inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mocoserve.core.decode import default_workers
from mocoserve.core.errors import UserError
from mocoserve.core.manifest import MAX_RESIZE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_METHOD = "moco-v2"


@dataclass
class DataConfig:
    root: str = ""
    val: str | None = None  # labelled folder for the k-NN monitor / linear-probe evaluation
    label_key: str | None = None  # tar shards: the json field holding the label (img2dataset)
    image_size: int = 224
    eval_resize: int | None = None  # shorter side before the centre crop; None: size * 256/224
    augmentation: str = "moco-v2"  # a recipe of augment.RECIPES; the method's by default
    blur: bool = True  # Gaussian blur in the moco-v2/supcon recipes (off for tiny images)
    hflip: bool = True  # off where mirroring changes meaning (digits, text)
    min_crop_scale: float = 0.2  # RandomResizedCrop's smallest area fraction
    gpu_augment: bool = False  # workers crop/flip only; colour jitter, gray, blur on the device
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    workers: int | None = None  # None: the cores this process may use, at most 8
    # pipe: shards (streamed, train/stream.py): samples each data worker holds to shuffle,
    # and seconds without a byte from a pipe: command before it is stopped
    shuffle_buffer: int = 2000
    stream_timeout: float = 300.0
    shard_counts: str | None = None  # a shards.json giving pipe: shards' counts (no counting)

    def resolved_eval_resize(self) -> int:
        if self.eval_resize is not None:
            return self.eval_resize
        return self.image_size if self.image_size <= 64 else round(self.image_size * 256 / 224)

    def resolved_workers(self) -> int:
        """Worker processes per training process: as configured, else what the machine has."""
        if self.workers is not None:
            return self.workers
        return default_workers(spare=0)


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    small_stem: bool = False  # 3x3 stride-1 stem and no max-pool, for 32-96 px images
    head: Literal["linear", "mlp"] = "mlp"  # projection head on top of the backbone
    dim: int = 128  # embedding dim of the head
    hidden_dim: int | None = None  # MLP hidden width; None: the backbone's feature dim
    bn_splits: int = 1  # split BatchNorm in one process (simulates multi-GPU BN statistics)
    # moco-v3's heads (the reference's _build_mlp): projection MLP depth (3 for ViT, 2 for
    # ResNet) and whether the 2-layer predictor ends in a BN without affine (ViT: yes)
    proj_layers: int = 2
    pred_last_bn: bool = False
    # timm:<name> only: keyword arguments of timm.create_model (img_size, patch_size, depth,
    # embed_dim, num_heads, drop_path_rate, ...)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    name: str = DEFAULT_METHOD  # a method of methods.METHODS
    temperature: float = 0.2
    queue_size: int = 65536
    momentum: float = 0.999  # momentum encoder update, m in the MoCo paper's eq. (2)
    shuffle_bn: bool = True
    base_temperature: float = 0.07  # SupCon only
    contrast_mode: Literal["all", "one"] = "all"  # SupCon anchors
    pretrained: str | None = None  # linear probe only: the pretraining checkpoint
    # moco-v3: keep ViT's random patch projection frozen (Chen et al. 2021, sec. 4.1); on in
    # its ViT recipe. Set true elsewhere (another method, a net without a patch_embed): refused
    freeze_patch_embed: bool = False


@dataclass
class OptimConfig:
    # sgd (momentum), adamw, or lars (timm's; no weight decay or adaptation for biases and
    # norm parameters, as moco-v3's LARS)
    optimizer: Literal["sgd", "adamw", "lars"] = "sgd"
    epochs: int = 200
    batch_size: int = 256  # per process; the global batch is this times the world size
    lr: float = 0.03  # at `lr_batch` images per step; scaled linearly with the global batch
    lr_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "step"] = "cosine"
    milestones: list[int] = field(default_factory=lambda: [120, 160])  # step schedule, x0.1
    warmup_epochs: int = 0


@dataclass
class RunConfig:
    out: str = "runs/train"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # CUDA only; the CPU trains in fp32
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


SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig))

# Presets apply to every method; a method adds its own part (MethodSpec.presets),
# both applied by configure.apply_preset.
PRESETS: dict[str, dict[str, Any]] = {
    # small images, after the MoCo CIFAR-10 demo: 32 px, 3x3 stem, 8 BN splits, lr per 512
    "cifar": {
        "model.arch": "resnet18",
        "model.small_stem": True,
        "model.bn_splits": 8,
        "data.image_size": 32,
        "data.blur": False,
        "optim.lr_batch": 512,
    },
}


def _plain(obj: Any) -> Any:
    """Tuples to lists, so the dict round-trips through YAML and torch.load(weights_only)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}; a field's own mapping (timm_kwargs) stays whole."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not prefix:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


@functools.cache
def _field_types(section: type) -> dict[str, Any]:
    return typing.get_type_hints(section)


def field_type(key: str, source: str = "option") -> Any:
    """The annotation of a dotted field (`optim.lr` -> float); unknown keys are errors."""
    section_name, _, field_name = key.partition(".")
    sections = _field_types(TrainConfig)
    if section_name not in sections:
        raise UserError(f"unknown {source} key {key!r}; sections are {', '.join(SECTIONS)}")
    if not field_name:
        raise UserError(f"{source} section {key!r} must be a mapping of its fields")
    types_of = _field_types(sections[section_name])
    if field_name not in types_of:
        raise UserError(f"unknown {source} key {key!r}; {section_name} has {', '.join(types_of)}")
    return types_of[field_name]


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], source: str = "option") -> None:
    """Set dotted fields (`optim.lr`), converting each by its annotation; bad keys/types fail."""
    for key, value in overrides.items():
        tp = field_type(key, source)
        section_name, _, field_name = key.partition(".")
        setattr(getattr(cfg, section_name), field_name, convert(value, tp, f"{source} {key}"))


_NAMES = {
    bool: ("true or false", "true/false values"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("text", "texts"),
}


def _describe(tp: Any) -> str:
    """What a value of type `tp` is, in words, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is dict:
        return "a mapping (e.g. {img_size: 32, depth: 2})"
    if origin in (list, tuple):
        inner = _NAMES.get(args[0], ("", "values"))[1] if args else "values"
        n = f"{len(args)} " if origin is tuple and args and args[-1] is not Ellipsis else ""
        return f"a list of {n}{inner}"
    return _NAMES.get(tp, (getattr(tp, "__name__", str(tp)),))[0]


def convert(value: Any, tp: Any, where: str) -> Any:
    """`value` as type `tp` (int, float, bool, str, Literal, X | None, list/tuple of them).

    Strict: 2.7 is not an integer, `true` is not a number, 3 is not text.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return convert(value, option, where)
            except UserError:
                continue
        raise UserError(f"{where} must be {_describe(tp)}, got {value!r}")
    ok = False
    if origin is Literal:
        ok = value in args
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is dict and isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise UserError(f"{where} must be a mapping with text keys, got key {bad[0]!r}")
        return {k: _plain_value(v, f"{where}.{k}") for k, v in value.items()}
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        if fixed and len(value) != len(args):
            raise UserError(f"{where} must be {_describe(tp)}, got {value!r}")
        inner = args if fixed else [args[0]] * len(value)
        items = [convert(v, t, where) for v, t in zip(value, inner, strict=True)]
        return tuple(items) if origin is tuple else items
    if not ok:
        raise UserError(f"{where} must be {_describe(tp)}, got {value!r}")
    return value


def _plain_value(value: Any, where: str) -> Any:
    """A value of a free mapping (timm_kwargs): YAML scalars and lists of them only."""
    if isinstance(value, (list, tuple)):
        return [_plain_value(v, where) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UserError(f"{where} must be a number, text, true/false or a list, got {value!r}")


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set section.field=value` options -> typed overrides (values read as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set takes section.field=value, got {item!r}")
        tp = field_type(key, "--set")
        try:
            value: Any = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise UserError(f"--set {key}: cannot read {text!r}") from None
        if _takes_text(tp) and (tp is str or value is not None):
            value = text  # text fields take the text as it is: "123" stays "123"
        out[key] = convert(value, tp, f"--set {key}")
    return out


def _takes_text(tp: Any) -> bool:
    return tp is str or (
        typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp)
    )


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a text file") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of sections ({', '.join(SECTIONS)})")
    return data


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# Fields that define the network and its state; a checkpoint resumes only under the same ones.
IDENTITY_FIELDS = (
    "method.name",
    "model.arch",
    "model.small_stem",
    "model.head",
    "model.dim",
    "model.hidden_dim",
    "model.timm_kwargs",
    "model.proj_layers",
    "model.pred_last_bn",
    "method.queue_size",
)


def get_field(cfg: TrainConfig, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def check_settings(cfg: TrainConfig) -> None:
    """Reject inconsistent settings with one clear message each (configure.validate adds the
    augmentation recipe's and the method's own checks)."""
    o, m, mo, d, r = cfg.optim, cfg.method, cfg.model, cfg.data, cfg.run
    checks = [
        (o.epochs >= 1, f"--epochs must be at least 1, got {o.epochs}"),
        (o.batch_size >= 1, f"--batch-size must be at least 1, got {o.batch_size}"),
        (o.lr > 0, f"learning rate must be positive, got {o.lr}"),
        (o.lr_batch >= 1, f"optim.lr_batch must be at least 1, got {o.lr_batch}"),
        (o.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {o.warmup_epochs}"),
        (m.temperature > 0, f"temperature must be positive, got {m.temperature}"),
        (m.base_temperature > 0, f"base temperature must be positive, got {m.base_temperature}"),
        (0.0 <= m.momentum < 1.0, f"momentum must be in [0, 1), got {m.momentum}"),
        (m.queue_size >= 0, f"--queue-size must be >= 0, got {m.queue_size}"),
        (mo.dim >= 1, f"--dim must be at least 1, got {mo.dim}"),
        (mo.proj_layers >= 1, f"model.proj_layers must be at least 1, got {mo.proj_layers}"),
        (
            mo.hidden_dim is None or mo.hidden_dim >= 1,
            f"model.hidden_dim must be at least 1 (or unset: the backbone's width), "
            f"got {mo.hidden_dim}",
        ),
        (mo.bn_splits >= 1, f"--bn-splits must be at least 1, got {mo.bn_splits}"),
        (
            o.batch_size % mo.bn_splits == 0,
            f"--batch-size {o.batch_size} is not divisible by --bn-splits {mo.bn_splits}",
        ),
        (d.image_size >= 16, f"image size must be at least 16 px, got {d.image_size}"),
        (
            d.eval_resize is None or d.eval_resize >= d.image_size,
            f"data.eval_resize ({d.eval_resize}) must be at least the image size",
        ),
        (
            d.eval_resize is None or d.eval_resize <= MAX_RESIZE,
            f"data.eval_resize must be at most {MAX_RESIZE} px, got {d.eval_resize}",
        ),
        (0 < d.min_crop_scale <= 1, f"min_crop_scale must be in (0, 1], got {d.min_crop_scale}"),
        (d.workers is None or d.workers >= 0, f"--workers must be >= 0, got {d.workers}"),
        (all(s > 0 for s in d.std), f"data.std must be positive, got {list(d.std)}"),
        (d.shuffle_buffer >= 1, f"data.shuffle_buffer must be at least 1, got {d.shuffle_buffer}"),
        (d.stream_timeout > 0, f"data.stream_timeout must be positive, got {d.stream_timeout}"),
        (r.save_every >= 1, "save_every must be at least 1"),
        (r.save_minutes > 0, "save_minutes must be positive"),
        (r.knn_every >= 1, "knn_every must be at least 1"),
        (r.knn_k >= 1, "knn_k must be at least 1"),
        (r.knn_temperature > 0, "knn_temperature must be positive"),
        (r.log_every >= 1, "log_every must be at least 1"),
        (r.max_steps is None or r.max_steps >= 1, "--max-steps must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
