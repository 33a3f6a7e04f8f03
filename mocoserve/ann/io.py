"""Index files: written atomically as CPU indexes, read back (on-disk lists memory-mapped)."""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

import faiss

from mocoserve.ann.factory import METRIC, base_ivf, on_disk
from mocoserve.core.files import replace_durably


def write_atomic(index: faiss.Index, path: str | Path) -> None:
    """Write a CPU index: a temp file beside `path`, fsync, rename, fsync the folder.

    An index with on-disk lists writes only its header and the lists' file name (the
    lists file is written before, under its own name).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            faiss.write_index(index, str(tmp))
        except RuntimeError as e:  # FAISS's C++ "fwrite ... failed": a full disk, mostly
            reason = str(e).strip().splitlines()[-1][:200]
            raise OSError(errno.EIO, f"cannot write the index ({reason})", str(path)) from None
        replace_durably(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def lists_file(index: faiss.Index) -> str | None:
    """The file an index's on-disk inverted lists live in, or None."""
    if not on_disk(index):
        return None
    return faiss.downcast_InvertedLists(base_ivf(index).invlists).filename


def read(path: str | Path, dim: int) -> faiss.Index | None:
    """Read an index written by `write_atomic`; None if missing, unreadable or not ours.

    On-disk inverted lists are memory-mapped read-only from the file beside `path` (the
    index is then never changed in place: a writer makes new lists and swaps the file).
    """
    path = Path(path)
    for _ in range(2):  # the lists file can be swapped between reading the header and it
        if not path.is_file():
            return None
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
        try:
            with quiet_stdout():
                index = faiss.read_index(str(path), flags)
        except RuntimeError:
            continue
        # read_index returns the downcast type; downcasting again would drop the owner
        if index.d != dim or index.metric_type != METRIC:
            return None
        if isinstance(index, faiss.IndexIDMap2) or base_ivf(index) is not None:
            return index
        return None
    return None


@contextmanager
def quiet_stdout():
    """Silence FAISS's unconditional C printf's (on-disk list resizes and renames).

    They go to file descriptor 1, not Python's sys.stdout; it is pointed at /dev/null for
    the duration, with C's buffers flushed on the way in and out so nothing leaks after.
    """
    import ctypes
    import sys

    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
