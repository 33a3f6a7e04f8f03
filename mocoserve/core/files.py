"""Writing files that must never be half-written, with the modes the user's umask asks for."""

from __future__ import annotations

import os
from pathlib import Path


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


def shown(path: str | os.PathLike) -> str:
    """A path fit to print: bytes that are not UTF-8 (surrogate escapes) as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
