"""Writing files that must never be half-written, with the modes the user's umask asks for;
lock files; file names as text for JSON and for a terminal."""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

from mocoserve.core.errors import UserError


def current_umask() -> int:
    """The process's umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_mode(directory: bool = False) -> int:
    """The mode open() or mkdir() would give a new file or folder under the current umask.

    mkstemp and mkdtemp make private 0o600 / 0o700 temps; what they become is set to this,
    so another user or a container's uid can read what the umask lets them read.
    """
    return (0o777 if directory else 0o666) & ~current_umask()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new file in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """fsync `source`, rename it over `target`, fsync the folder."""
    fsync_file(source)
    os.replace(source, target)
    fsync_dir(Path(target).parent)


def lock_file(path: str | os.PathLike, busy: str, wait: bool = False) -> int:
    """An exclusive flock on `path` (made if missing): a file descriptor, closing it releases
    the lock. Held by another process: a UserError `busy`, or, with `wait`, wait for it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise UserError(busy) from None
    return fd


def path_text(path: str | os.PathLike) -> str:
    """A path as UTF-8 text (JSON, parquet): each byte that is not UTF-8 as the text \\xNN.

    Python holds such bytes of a POSIX name as surrogate escapes, which no UTF-8 encoder
    accepts; UTF-8 names come back unchanged.
    """
    name = os.fspath(path)
    if isinstance(name, str):
        try:
            name = name.encode("utf-8", "surrogateescape")  # as the store keeps it (db_path)
        except UnicodeEncodeError:  # a surrogate that no file name yields
            name = name.encode("utf-8", "backslashreplace")
    return name.decode("utf-8", "backslashreplace")


# C0, DEL, C1, and the bidirectional overrides and isolates (they reorder what follows)
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape_control(match: re.Match) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: str | os.PathLike) -> str:
    """A path, label or message fit to print on a terminal: `path_text`, and control
    characters (an escape sequence in a file name) as \\xNN or \\uNNNN, never raw."""
    return _CONTROLS.sub(_escape_control, path_text(text))
