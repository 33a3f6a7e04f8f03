"""Decoding files for embedding, in worker processes: bytes read once, hashed, decoded, cropped.

Light on purpose (PIL and numpy): each worker process imports only this.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mocoserve.core import tars
from mocoserve.core.images import TooManyPixels, decode_image, header_pixels, resize_crop

# JPEG draft decoding (DCT-domain downscaling) only down to 4x the resize target: the
# antialiased resize from there matches a full decode (cosine >= 0.9999 to the training-time
# eval transform, tests/test_service.py), while a 12-MP photo still decodes 2-4x faster.
DRAFT_HEADROOM = 4
# Pixels one image may have (its header's width x height), refused before decoding: room for
# 48- and 50-MP phone photos. Decoding allocates 4 bytes a pixel (Pillow keeps RGB as RGBX),
# so this bounds one RGB decode at ~256 MB (alpha adds copies); the model reads resize^2.
MAX_IMAGE_PIXELS = 64_000_000
# Pillow warns above its own guard (core/images.py), above the limits serve and embed use:
# such an image is refused with our reason, and the warning would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Failures a decode of bad bytes raises (DecompressionBombError is Pillow's own limit).
_BAD_IMAGE = (Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError, MemoryError)


@dataclass
class Decoded:
    """One file, ready for the model (`pixels`) or with the reason it is not (`error`)."""

    path: str
    bytes: int
    mtime: int
    sha256: str = ""
    width: int = 0
    height: int = 0
    pixels: np.ndarray | None = None  # crop x crop x 3 uint8
    error: str | None = None
    code: str | None = None  # the error as a word: empty, not_an_image, too_many_pixels, ...


@dataclass(frozen=True)
class Header:
    """What an image's header says, before any pixel is decoded (or why it will not decode)."""

    pixels: int = 0  # width x height as stored
    cost: int = 0  # pixels the decode allocates: fewer for a JPEG decoded in draft mode
    error: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class ByteRange:
    """`size` bytes at `offset` of a file (a tar member), as listed when its file's mtime
    was `mtime` (ns): a decoder process reads them itself, no bytes through a pipe."""

    path: str
    offset: int
    size: int
    mtime: int
    member: str | None = None  # the tar member's name, checked against its header


def read_range(part: ByteRange) -> bytes:
    """The range's bytes; an OSError if its file changed since it was listed or is short."""
    with open(part.path, "rb") as f:
        if os.fstat(f.fileno()).st_mtime_ns != part.mtime:
            raise OSError(f"{part.path} changed since it was listed")
        # the member's header is read and checked with its data: never another member's bytes
        return tars.pread_member(f.fileno(), part.path, part.offset, part.size, part.member)


def decode_file(
    path: str | ByteRange,
    resize: int,
    crop: int,
    max_pixels: int = MAX_IMAGE_PIXELS,
    interpolation: str = "bilinear",
) -> Decoded:
    """Read, hash and decode one file (or a range of one); never raises for a bad file."""
    if isinstance(path, ByteRange):
        try:
            data = read_range(path)
        except OSError as e:
            error = f"cannot read: {e.strerror or e}"
            return Decoded(path.path, 0, 0, error=error, code="unreadable")
        return decode_bytes(data, resize, crop, path.path, path.mtime, max_pixels, interpolation)
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return Decoded(path, 0, 0, error=f"cannot read: {e.strerror or e}", code="unreadable")
    return decode_bytes(data, resize, crop, path, st.st_mtime_ns, max_pixels, interpolation)


def read_header(data: bytes, resize: int, max_pixels: int = MAX_IMAGE_PIXELS) -> Header:
    """The pixels of an image's bytes and what decoding them costs, from the header only."""
    if not data:
        return Header(error="empty file (0 bytes)", code="empty")
    try:
        pixels, cost = header_pixels(io.BytesIO(data), resize * DRAFT_HEADROOM, max_pixels)
    except _BAD_IMAGE as e:
        error, code = _reason(e)
        return Header(error=error, code=code)
    return Header(pixels, cost)


def decode_bytes(
    data: bytes,
    resize: int,
    crop: int,
    path: str = "",
    mtime: int = 0,
    max_pixels: int = MAX_IMAGE_PIXELS,
    interpolation: str = "bilinear",
) -> Decoded:
    """Hash and decode an image's bytes (a file's, an upload's); never raises for bad bytes.

    An image over `max_pixels` is refused from its header (code too_many_pixels); the resize
    uses the package's `interpolation`.
    """
    item = Decoded(path, len(data), mtime, hashlib.sha256(data).hexdigest())
    if not data:
        item.error, item.code = "empty file (0 bytes)", "empty"
        return item
    try:
        draft = resize * DRAFT_HEADROOM
        image, (item.width, item.height) = decode_image(io.BytesIO(data), draft, max_pixels)
        item.pixels = np.asarray(resize_crop(image, resize, crop, interpolation), dtype=np.uint8)
    except _BAD_IMAGE as e:
        item.error, item.code = _reason(e)
    return item


def _reason(e: BaseException) -> tuple[str, str]:
    """A failed decode's (error, code)."""
    if isinstance(e, TooManyPixels):
        return f"too many pixels: {e}", "too_many_pixels"
    if isinstance(e, Image.DecompressionBombError):
        return f"too many pixels (decompression-bomb limit): {e}", "too_many_pixels"
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image (PIL cannot identify the file)", "not_an_image"
    return f"cannot decode: {type(e).__name__}: {e}", "undecodable"


def _decode_chunk(
    paths: Sequence[str | ByteRange], resize: int, crop: int, interpolation: str = "bilinear"
) -> list[Decoded]:
    return [decode_file(p, resize, crop, interpolation=interpolation) for p in paths]


def _worker_init() -> None:
    """Ctrl-C is the main process's to handle; a worker whose parent died exits.

    Each worker holds both ends of its task queue's pipe, so it would wait forever for
    work from a parent killed with SIGKILL (pre-emption, the OOM killer).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def default_workers(spare: int = 1) -> int:
    """Worker processes: the cores this process may use (shared by torchrun's processes on
    the node), `spare` of them left to the model (embed leaves one, training none), at most 8,
    at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cores // local - spare))


def decode_files(
    paths: Sequence[str | ByteRange],
    resize: int,
    crop: int,
    workers: int,
    chunk: int = 16,
    interpolation: str = "bilinear",
) -> Iterator[Decoded]:
    """Decode files in order, `workers` processes (0: in this process), bounded read-ahead."""
    if workers <= 0:
        for path in paths:
            yield decode_file(path, resize, crop, interpolation=interpolation)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a threaded ORT process
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
        yield from _ordered(pool, paths, (resize, crop, interpolation), chunk, window=4 * workers)


def _ordered(
    pool: Executor,
    paths: Sequence[str | ByteRange],
    how: tuple[int, int, str],
    chunk: int,
    window: int,
) -> Iterator[Decoded]:
    """`how`: (resize, crop, interpolation) for each chunk's `_decode_chunk`."""
    pending: deque[Future] = deque()
    starts = iter(range(0, len(paths), chunk))
    for start in starts:
        pending.append(pool.submit(_decode_chunk, paths[start : start + chunk], *how))
        if len(pending) >= window:
            break
    while pending:
        done = pending.popleft().result()
        start = next(starts, None)
        if start is not None:
            pending.append(pool.submit(_decode_chunk, paths[start : start + chunk], *how))
        yield from done
