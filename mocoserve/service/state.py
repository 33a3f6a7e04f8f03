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

from mocoserve.core.decode import MAX_IMAGE_PIXELS, default_workers
from mocoserve.core.errors import UserError
from mocoserve.core.manifest import model_fingerprint
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
    max_hits: int = 10_000  # k x queries of one search: bounds an answer's size; more is a 422
    max_connections: int = 128  # requests in the app at once (health checks aside); more: 503
    api_keys: tuple[str, ...] = ()
    ui: bool = True
    cors_origins: tuple[str, ...] = ()
    expose_paths: bool = False
    reload_seconds: float = 1.0
    decode_threads: int = field(default_factory=lambda: max(2, default_workers()))
    max_image_pixels: int = MAX_IMAGE_PIXELS  # one image's (header); more: that image fails
    max_request_pixels: int = 256_000_000  # a request's images together; more is a 413

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


@dataclass
class Served:
    """One loaded index and the lock its SQLite connection and FAISS index share."""

    index: Any  # mocoserve.index.reader.ImageIndex
    signature: tuple[int, int, int] | None
    loaded_at: float
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def version(self) -> int:
        return self.index.version


RETRY_INTERVALS = 10  # a file that failed to load is tried again after 10 watch intervals,
RETRY_MAX_S = 300.0  # then twice as long each time, up to 5 minutes (or at once if it changes)


def reason(e: BaseException) -> str:
    """One line for an error: ours say what happened; others (sqlite3's) also what kind."""
    return str(e) if isinstance(e, (UserError, OSError)) else f"{type(e).__name__}: {e}"


def model_sha256(encoder: Any) -> str:
    """sha256 of the package's manifest.json (what an index records as its model), once."""
    if getattr(encoder, "_manifest_sha256", None) is None:
        encoder._manifest_sha256 = model_fingerprint(encoder.path)
    return encoder._manifest_sha256


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
        self.on_reload_error: list[Any] = []  # called with (message) after each failed reload
        self._failed: tuple[Any, float, float] | None = None  # (signature, retry at, pause)

    @property
    def ready(self) -> bool:
        """Able to answer: loaded; a reload opens the next index while the current one serves."""
        return self.status in ("ready", "reloading")

    def load(self) -> None:
        """Load the model and open the index (blocking; the service runs it in a thread)."""
        import mocoserve.index.reader

        c = self.config
        try:
            encoder = load(c.model, device=c.device) if c.model is not None else None
            if c.index is not None:
                signature = file_signature(c.index)
                index = mocoserve.index.reader.open(c.index, c.model, c.device, readonly=True)
                if encoder is not None:
                    index.attach(encoder)
                encoder = index.encoder
                self._swap(Served(index, signature, time.time()))
            self.encoder = encoder
        except Exception as e:
            self.status, self.error = "failed", reason(e)
            raise
        self.status = "ready"

    def _swap(self, served: Served) -> None:
        self.served = served
        for callback in self.on_swap:
            callback(served)

    def reload_if_changed(self) -> bool:
        """Open the index again if its file changed since it was loaded; True if swapped.

        A reload that fails, whatever the error (an index rebuilt with another model, a
        damaged file or database), keeps the old index serving, says why (the log,
        /v1/info's reload_error, `on_reload_error`), and tries the same file again after a
        pause that doubles each time; a new save is tried at once.
        """
        current, c = self.served, self.config
        if current is None or c.index is None:
            return False
        signature = file_signature(c.index)
        if signature is None or signature == current.signature:
            return False
        failed = self._failed
        if failed is not None and failed[0] == signature and time.monotonic() < failed[1]:
            return False
        self.status = "reloading"
        try:
            index = self._open_index()
            self._swap(Served(index, signature, time.time()))
        except Exception as e:  # the watcher outlives any error (sqlite3's are not ours)
            self._reload_failed(signature, e)
            return False
        finally:
            self.status = "ready"
        self._failed, self.reload_error = None, None
        log.info("reloaded %s: version %d, %d items", c.index, index.version, len(index))
        return True

    def _open_index(self) -> Any:
        import mocoserve.index.reader

        c = self.config
        assert c.index is not None
        index = mocoserve.index.reader.open(c.index, c.model, c.device, readonly=True)
        try:
            index.attach(self.encoder)  # the model loaded once: the index must be its index
        except BaseException:
            index.close()  # refused: its files are not held open
            raise
        return index

    def _reload_failed(self, signature: Any, e: Exception) -> None:
        message = reason(e)
        previous = self._failed
        if previous is not None and previous[0] == signature:
            pause = min(RETRY_MAX_S, previous[2] * 2)
        else:
            pause = min(RETRY_MAX_S, self.config.reload_seconds * RETRY_INTERVALS)
        self._failed = (signature, time.monotonic() + pause, pause)
        self.reload_error = message
        version = self.served.version if self.served is not None else 0
        log.warning(
            "kept the loaded index (version %d): %s; trying this file again in %.0f s",
            version,
            message,
            pause,
        )
        for callback in self.on_reload_error:
            callback(message)
