"""A run's configuration resolved and checked: where the config meets the method registry.

Precedence, lowest first: the method's paper defaults (from the method registry), a preset,
a YAML file, CLI options and `--set section.field=value`. `config` holds the types and knows
no method; the registry's methods read config types; this module stands on both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mocoserve.core.errors import UserError
from mocoserve.train.augment import recipe
from mocoserve.train.config import (
    DEFAULT_METHOD,
    PRESETS,
    TrainConfig,
    apply_overrides,
    check_settings,
    convert,
    flatten,
    load_yaml,
)
from mocoserve.train.methods import get_spec


def method_defaults(method: str) -> TrainConfig:
    """The paper defaults of a method, from its entry in the method registry."""
    spec = get_spec(method)
    cfg = TrainConfig()
    apply_overrides(cfg, {"method.name": spec.name, **spec.defaults}, source="method default")
    return cfg


def apply_preset(cfg: TrainConfig, preset: str) -> None:
    """A preset's common settings, then the method's own part of it."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    apply_overrides(cfg, PRESETS[preset], source="preset")
    apply_overrides(cfg, get_spec(cfg.method.name).presets.get(preset, {}), source="preset")


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
    overrides = overrides or {}
    chosen = method or overrides.get("method.name") or from_file.get("method.name")
    chosen = chosen or DEFAULT_METHOD
    cfg = method_defaults(convert(chosen, str, "method.name"))
    if preset:
        apply_preset(cfg, preset)
    apply_overrides(cfg, from_file, source="config")
    apply_overrides(cfg, {**overrides, "method.name": chosen})
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Reject inconsistent settings with one clear message each; the method checks its own."""
    check_settings(cfg)
    r = recipe(cfg.data.augmentation)
    if cfg.data.gpu_augment and not r.gpu_ready:
        raise UserError(
            f"--gpu-augment does not run the {r.name} recipe (per-view blur and "
            "solarisation); train with --cpu-augment"
        )
    get_spec(cfg.method.name).cls.check_config(cfg)
