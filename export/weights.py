"""A pretrained state-dict file (torchvision or timm) packaged with no training run.

`export_weights` reads the file (`torch.load(weights_only=True)` or safetensors), unwraps the
common wrappers ({"state_dict": ...}, {"model": ...}, `module.` / `_orig_mod.` prefixes),
drops the classifier on purpose, and loads the rest strictly: a key or shape that does not
fit the architecture is one UserError naming the first few. The preprocessing comes from
`export.preprocess`; the package is written by `package.write_package` like a checkpoint's.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mocoserve import __version__
from mocoserve.core.errors import UserError
from mocoserve.core.manifest import Manifest, sha256_file
from mocoserve.export.package import (
    FORMATS,
    EmbeddingModel,
    ExportResult,
    check_options,
    check_out,
    embedding_dim,
    write_package,
)
from mocoserve.export.preprocess import (
    Chosen,
    PreprocessOptions,
    apply_options,
    from_timm,
    from_torchvision,
    imagenet_defaults,
    torchvision_entry,
)
from mocoserve.train.config import TrainConfig, apply_overrides
from mocoserve.train.models import TIMM_PREFIX, build_backbone, check_arch, is_timm

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
WRAPPER_KEYS = ("state_dict", "model")  # {"state_dict": ...} (Lightning, timm), {"model": ...}
MODEL_SETTINGS = ("model.timm_kwargs", "model.small_stem")  # what --set may give with --weights
SHOWN = 3  # keys named in a mismatch line, of each kind


@dataclass
class Backbone:
    """The architecture built with random weights, and what its file's classifier is called."""

    module: nn.Module
    classifier: tuple[str, ...]  # key prefixes of the classification layer, dropped on load
    settings: dict[str, Any]  # the model.* settings it was built with (for the manifest)


def build(arch: str, settings: dict[str, Any] | None = None) -> Backbone:
    """`arch` (a torchvision ResNet or timm:<name>) without its classifier, random weights."""
    check_arch(arch)
    settings = dict(settings or {})
    bad = sorted(set(settings) - set(MODEL_SETTINGS))
    if bad:
        raise UserError(
            f"--set {bad[0]} does not apply to --weights; it takes {', '.join(MODEL_SETTINGS)}"
        )
    cfg = TrainConfig()
    apply_overrides(cfg, {"model.arch": arch, **settings}, source="--set")
    module, _ = build_backbone(cfg.model)
    if is_timm(arch):
        named = module.pretrained_cfg.get("classifier") or "head"
        classifier = (named,) if isinstance(named, str) else tuple(named)
    else:
        classifier = ("fc",)  # torchvision ResNets' classification layer
    return Backbone(module.eval(), classifier, settings)


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of a weights file and the wrapper key they were under (None: top level)."""
    if path.is_dir():
        raise UserError(f"--weights {path} is a folder; give the state-dict file in it")
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise UserError(f"--weights takes a {', '.join(WEIGHT_SUFFIXES)} file, got {path.name}")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    else:
        try:
            with warnings.catch_warnings():  # a plain pickle's protocol warning: not our line
                warnings.simplefilter("ignore")
                data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle refused (not only tensors), a damaged zip, not torch at all
            first = _why_unreadable(e)
            raise UserError(
                f"{path} is not a state dict torch.load(weights_only=True) can read ({first}); "
                "save the model's state_dict() (torch.save or safetensors)"
            ) from None
    if isinstance(data, dict) and "train_state" in data and "config" in data:
        raise UserError(f"{path} is a mocoserve training checkpoint: export it without --weights")
    key = None
    if isinstance(data, dict):
        key = next((k for k in WRAPPER_KEYS if isinstance(data.get(k), dict)), None)
        data = data[key] if key else data
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path} holds no state dict (a mapping of names to tensors)")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(data):
        other = next(k for k, v in data.items() if not isinstance(v, torch.Tensor))
        raise UserError(
            f"{path}: {other!r} is not a tensor; --weights takes a model's state_dict()"
        )
    broken = next(
        (k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()), None
    )
    if broken is not None:
        raise UserError(f"{path}: tensor {broken!r} holds NaN or inf; the weights are damaged")
    from timm.models import clean_state_dict

    return clean_state_dict(tensors), key  # DDP's module., torch.compile's _orig_mod.


def _why_unreadable(error: Exception) -> str:
    """torch.load's reason in a few words: the refused global, not its advice to drop the guard."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("Weights only load failed"):
        noise = ("Please file an issue", "Check the documentation")
        reasons = [line for line in lines[1:] if not line.startswith(noise)]
        # e.g. "Trying to load unsupported GLOBAL posix.system ...", "Unsupported operand 149"
        return reasons[0] if reasons else "it holds objects that are not tensors"
    return lines[0]


def _shape(t: torch.Tensor | torch.Size) -> str:
    return "x".join(map(str, t.shape if isinstance(t, torch.Tensor) else t)) or "scalar"


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (", …" if len(keys) > SHOWN else "")


def fit(backbone: Backbone, state: dict[str, torch.Tensor], where: str, arch: str) -> list[str]:
    """Load `state` into the backbone strictly, the classifier dropped; the dropped keys.

    Any other key that does not fit is a UserError in one line, never a partial load.
    """
    expected = backbone.module.state_dict()
    dropped = sorted(
        k
        for k in state
        if k not in expected and any(k.startswith(p + ".") for p in backbone.classifier)
    )
    state = {k: v for k, v in state.items() if k not in dropped}
    # BatchNorm fills in a num_batches_tracked older files (torchvision's) do not have
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {_shape(state[k])}, model {_shape(v)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(missing)} keys missing ({_names(missing)})" if missing else "",
            f"{len(unexpected)} unexpected keys ({_names(unexpected)})" if unexpected else "",
            f"{len(shapes)} tensors of another shape ({_names(shapes)})" if shapes else "",
        ]
        hint = "model.timm_kwargs (--set)" if is_timm(arch) else "--arch"
        raise UserError(
            f"{where} does not fit {arch}: {'; '.join(p for p in parts if p)}; check {hint}"
        )
    for k in expected:  # BatchNorm's counter: unused in eval mode, absent from older files
        state.setdefault(k, expected[k])
    backbone.module.load_state_dict(state, strict=True)
    return dropped


def choose_preprocess(
    backbone: Backbone,
    arch: str,
    path: Path,
    sha256: str,
    weights_name: str | None,
    options: PreprocessOptions,
) -> Chosen:
    """The preprocessing of the weights (timm's config, the torchvision entry) under the options."""
    if is_timm(arch):
        if weights_name is not None:
            raise UserError("--weights-name names torchvision weights; timm's come with the model")
        base = from_timm(backbone.module, arch[len(TIMM_PREFIX) :])
    else:
        entry = torchvision_entry(arch, path, sha256, weights_name)
        if entry is not None:
            base = from_torchvision(entry)
        else:
            base = dataclasses.replace(
                imagenet_defaults(),
                origin="ImageNet defaults: no torchvision weights entry is this file",
            )
    return apply_options(base, options)


def export_weights(
    weights: str | Path,
    arch: str,
    out: str | Path,
    settings: dict[str, Any] | None = None,
    options: PreprocessOptions = PreprocessOptions(),
    weights_name: str | None = None,
    opset: int = 18,
    formats: tuple[str, ...] = FORMATS,
    fp16: bool = False,
) -> ExportResult:
    """Write a verified model package of a pretrained backbone's pooled features to `out`."""
    check_options("backbone", formats, fp16, options.input_size, opset)
    path, out = Path(weights), Path(out)
    check_out(out)
    backbone = build(arch, settings)
    state, key = read_state_dict(path)
    dropped = fit(backbone, state, path.name, arch)
    sha256 = sha256_file(path)
    chosen = choose_preprocess(backbone, arch, path, sha256, weights_name, options)
    reference = EmbeddingModel(backbone.module, None, list(chosen.mean), list(chosen.std)).eval()
    manifest = Manifest(
        embedding_dim=embedding_dim(reference, chosen.input_size),
        input_size=chosen.input_size,
        preprocess=chosen.record(),
        output="backbone",
        files={},
        source={
            "kind": "weights",
            "arch": arch,
            "weights": path.name,
            "weights_sha256": sha256,
            "state_dict_key": key,
            "dropped_keys": dropped,
            "model_settings": backbone.settings,
            "preprocess_from": chosen.origin,
        },
        created_by=f"mocoserve {__version__}",
    )
    notes = [chosen.line()]
    if dropped:
        notes.insert(
            0, f"dropped the classifier ({_names(dropped)}): packages embed pooled features"
        )
    result = write_package(reference, manifest, out, formats, opset, fp16, arch)
    result.notes = notes
    return result
