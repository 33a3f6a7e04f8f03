"""Checkpoints: written atomically by rank 0, loaded without running pickled code."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocoserve.core.errors import UserError

FORMAT = "mocoserve-checkpoint"
VERSION = 1


def rng_state() -> dict[str, Any]:
    """Every RNG the training step touches, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _listify(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _listify(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_listify(v) for v in obj]
    return obj


def model_state(
    method: str,
    cfg: Any,
    module: torch.nn.Module,
    epoch: int = 0,
    epoch_step: int = 0,
    step: int = 0,
) -> dict[str, Any]:
    """What every checkpoint holds: format, method, arch, config, weights and position.

    Enough for export; the training loop adds optimizer, scaler, scheduler, rng and metrics.
    """
    return {
        "format": FORMAT,
        "version": VERSION,
        "method": method,
        "arch": cfg.model.arch,
        "config": cfg.to_dict(),
        "model": module.state_dict(),
        "epoch": epoch,
        "epoch_step": epoch_step,
        "step": step,
    }


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a mocoserve checkpoint with torch.load(weights_only=True); clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        # mmap: tensors are read when used, so a look at the config (prepare_config, the
        # linear probe's pretraining checkpoint) does not read hundreds of MB of weights
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:  # torch.load raises many kinds (KeyError, UnpicklingError, ...) on junk
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable mocoserve checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a mocoserve checkpoint")
    if int(ckpt.get("version", 0)) > VERSION:
        raise UserError(
            f"{path} has checkpoint version {ckpt['version']}; this mocoserve reads {VERSION}"
        )
    return ckpt


def query_encoder_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The query encoder's weights (backbone + head) from a checkpoint's method state."""
    prefix = "query_encoder."
    return {k[len(prefix) :]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}


def latest(out_dir: str | Path) -> Path | None:
    """The checkpoint `--resume auto` continues from: last.pt, else the newest epoch_NNNN.pt."""
    folder = Path(out_dir) / "checkpoints"
    if (folder / "last.pt").is_file():
        return folder / "last.pt"
    epochs = sorted(folder.glob("epoch_*.pt"))
    return epochs[-1] if epochs else None
