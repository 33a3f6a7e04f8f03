"""What the service serves: one model, and one index that is reloaded when `embed` saves it.

The index is opened read-only (a reader never writes a file). A watcher notices a new
index file (embed's atomic rename) and opens it beside the old one; the swap is one
reference assignment, so in-flight requests finish on the index they started with and no
request ever sees a half-loaded index.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mocoserve.core.errors import UserError
from mocoserve.decode import default_workers
from mocoserve.model import PackageEncoder, load

log = logging.getLogger("mocoserve.serve")


@dataclass(frozen=True)
class ServiceConfig:
    """`mocoserve serve`'s settings."""

    model: Path | None = None
    index: Path | None = None
    device: str = "auto"
    max_batch: int = 64
    max_delay_ms: float = 5.0
    max_queue: int = 1024  # images waiting for the model; more is a 503
    max_upload_mb: float = 20.0  # a request body; more is a 413
    max_images: int = 256  # per request
    api_keys: tuple[str, ...] = ()
    ui: bool = True
    cors_origins: tuple[str, ...] = ()
    expose_paths: bool = False
    reload_seconds: float = 1.0
    decode_threads: int = field(default_factory=lambda: max(2, default_workers()))

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


@dataclass
class Served:
    """One loaded index and the lock its SQLite connection and FAISS index share."""

    index: Any  # mocoserve.index.ImageIndex
    signature: tuple[int, int, int] | None
    loaded_at: float
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def version(self) -> int:
        return self.index.version


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime, size) of the index file: a save (an atomic rename) changes it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class ServiceState:
    """The model, the current index, and whether both are loaded (`status`)."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.encoder: PackageEncoder | None = None
        self.served: Served | None = None
        self.status = "loading"  # loading | ready | reloading | failed
        self.error: str | None = None
        self.reload_error: str | None = None
        self.on_swap: list[Any] = []  # called with (served) after each load and reload

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def load(self) -> None:
        """Load the model and open the index (blocking; the service runs it in a thread)."""
        import mocoserve.index

        c = self.config
        try:
            encoder = load(c.model, device=c.device) if c.model is not None else None
            if c.index is not None:
                signature = file_signature(c.index)
                index = mocoserve.index.open(c.index, c.model, c.device, readonly=True)
                if encoder is not None:
                    index.attach(encoder)
                encoder = index.encoder
                self._swap(Served(index, signature, time.time()))
            self.encoder = encoder
        except UserError as e:
            self.status, self.error = "failed", str(e)
            raise
        self.status = "ready"

    def _swap(self, served: Served) -> None:
        self.served = served
        for callback in self.on_swap:
            callback(served)

    def reload_if_changed(self) -> bool:
        """Open the index again if its file changed since it was loaded; True if swapped.

        A reload that fails (an index rebuilt with another model, a damaged file) keeps the
        old index serving and says why in /v1/info.
        """
        import mocoserve.index

        current, c = self.served, self.config
        if current is None or c.index is None:
            return False
        signature = file_signature(c.index)
        if signature is None or signature == current.signature:
            return False
        self.status = "reloading"
        try:
            index = mocoserve.index.open(c.index, c.model, c.device, readonly=True)
            index.attach(self.encoder)  # the model loaded once: the index must be its index
            self._swap(Served(index, signature, time.time()))
            self.reload_error = None
            log.info("reloaded %s: version %d, %d items", c.index, index.version, len(index))
            return True
        except (UserError, OSError) as e:
            self.reload_error = str(e)
            current.signature = signature  # do not retry the same file every second
            log.warning("kept the loaded index: %s", e)
            return False
        finally:
            self.status = "ready"
