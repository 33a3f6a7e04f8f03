"""Checkpoints: written atomically by rank 0, loaded without running pickled code.

`Checkpointer` owns when and how a run saves (`should_save`, `save`, the kept-epoch hard
link, `save_minutes`, RNG capture) and restores: everything that resumes is a component
with `state_dict` / `load_state_dict`, so the Trainer never builds a checkpoint dict by hand.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mocoserve.core.errors import UserError
from mocoserve.core.files import fsync_dir, public_mode
from mocoserve.train import distributed

FORMAT = "mocoserve-checkpoint"
VERSION = 2  # 2: position in `train_state`, the sampler's layout in `sampler`
POSITION = ("epoch", "epoch_step", "step")
OPTIONAL_COMPONENTS = ("sampler",)  # absent from version 1 files


class Stateful(Protocol):
    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...


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


def header(method: str, cfg: Any, classes: list[str] | None = None) -> dict[str, Any]:
    """What identifies every checkpoint: format, version, method, arch, config, classes."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "method": method,
        "arch": cfg.model.arch,
        "config": cfg.to_dict(),
        "classes": list(classes or []),
    }


def model_state(
    method: str,
    cfg: Any,
    module: torch.nn.Module,
    epoch: int = 0,
    epoch_step: int = 0,
    step: int = 0,
) -> dict[str, Any]:
    """A checkpoint of weights and position only: enough for export and the probe.

    (The Trainer's checkpoints add optimizer, scaler, scheduler, sampler, rng and metrics.)
    """
    return {
        **header(method, cfg),
        "model": module.state_dict(),
        "train_state": {"epoch": epoch, "epoch_step": epoch_step, "step": step},
    }


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, rename: never a half-written file.

    The file gets the mode a plain open() would give it (0o666 less the umask), not mkstemp's
    private 0o600, so another user or a container's uid can read it where the umask says so.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, public_mode())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, RuntimeError) and isinstance(e.__cause__ or e.__context__, OSError):
            raise (e.__cause__ or e.__context__) from None  # torch.save wraps ENOSPC and friends
        raise


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a mocoserve checkpoint with torch.load(weights_only=True); clear errors otherwise.

    A version 1 file is upgraded in memory (its position moves into `train_state`).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        # mmap: tensors are read when used, so a look at the config (prepare_config, the
        # linear probe's pretraining checkpoint) does not read hundreds of MB of weights
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        # never repeat torch's advice to retry with weights_only=False: that runs the payload
        raise UserError(
            f"{path} is not a mocoserve checkpoint: it holds pickled objects other than "
            "tensors and plain values, which mocoserve does not load"
        ) from None
    except (RuntimeError, ValueError, EOFError, zipfile.BadZipFile, KeyError, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # permissions and the like: the OS error, as it is
        raise UserError(f"{path} is not a mocoserve checkpoint (not a torch.save file)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a mocoserve checkpoint")
    version = int(ckpt.get("version", 0))
    if version > VERSION:
        raise UserError(
            f"{path} has checkpoint version {version}; this mocoserve reads up to {VERSION} "
            "(upgrade mocoserve)"
        )
    if version < 2:
        ckpt["train_state"] = {k: int(ckpt.pop(k, 0)) for k in POSITION}
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


class Checkpointer:
    """Saves and restores a run's components; decides when (epoch ends, every few minutes).

    `components` maps checkpoint keys to objects with state_dict/load_state_dict; `position`
    is the one whose `epoch` names kept checkpoints. `prepare` runs on every rank before a
    save (it may be a collective, e.g. averaging BN statistics); only `writer` ranks write.
    """

    def __init__(
        self,
        folder: str | Path,
        head: dict[str, Any],
        components: dict[str, Stateful],
        save_every: int = 10,
        save_minutes: float = 30.0,
        writer: bool = True,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.head = head
        self.components = components
        self.save_every = save_every
        self.save_minutes = save_minutes
        self.writer = writer
        self.prepare = prepare
        self.last_save = time.monotonic()
        self.pending_rng: dict[str, Any] | None = None

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    def keeps(self, epochs_done: int, final: bool) -> bool:
        """Whether the checkpoint at the end of this epoch is kept as epoch_NNNN.pt."""
        return final or epochs_done % self.save_every == 0

    def should_save(self, at_log: bool, device: torch.device) -> bool:
        """Mid-epoch: save_minutes have passed; ranks agree (a collective) at log steps only."""
        if not at_log:
            return False
        due = time.monotonic() - self.last_save > self.save_minutes * 60
        return distributed.any_rank(due and self.writer, device)

    def state(self, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint as a dict: header, every component's state, RNG states, metrics."""
        return {
            **self.head,
            **{name: c.state_dict() for name, c in self.components.items()},
            "rng": rng_state(),
            "metrics": metrics or {},
        }

    def save(self, metrics: dict[str, Any] | None = None, keep_epoch: int | None = None):
        """Write last.pt (and epoch_NNNN.pt when `keep_epoch` is given); None on other ranks.

        A failed write (a full disk) raises and leaves the previous last.pt as it was.
        """
        if self.prepare is not None:
            self.prepare()
        if not self.writer:
            return None
        state = self.state(metrics)
        try:
            save_atomic(state, self.last)
        except OSError as e:  # a full disk: the previous last.pt is still whole
            kept = " (the previous one is kept)" if self.last.exists() else ""
            raise OSError(
                e.errno, f"cannot write the checkpoint: {e.strerror}{kept}", str(self.last)
            ) from None
        self.last_save = time.monotonic()
        if keep_epoch is None:
            return self.last
        kept = self.folder / f"epoch_{keep_epoch:04d}.pt"
        tmp = kept.with_suffix(".pt.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(self.last, tmp)  # the same bytes as last.pt, without writing them twice
        except OSError:
            save_atomic(state, tmp)
        os.replace(tmp, kept)
        return kept

    def restore(self, path: str | Path) -> dict[str, Any]:
        """Load every component from a checkpoint; its RNG states wait for `resume_rng`."""
        ckpt = load(path)
        for name, component in self.components.items():
            if name in ckpt:
                component.load_state_dict(ckpt[name])
            elif name not in OPTIONAL_COMPONENTS:
                raise UserError(f"{path} has no {name} state; it cannot be resumed")
        self.pending_rng = ckpt.get("rng")
        return ckpt

    def resume_rng(self) -> None:
        """Put the restored RNG states back (at the start of training, after all set-up)."""
        if self.pending_rng is not None:
            set_rng_state(self.pending_rng)
            self.pending_rng = None
