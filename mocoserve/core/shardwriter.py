"""`write_shards`: an image folder as WebDataset tar shards (`mocoserve shards`).

Each image is one sample, its bytes as they are (never re-encoded): the image member
`000000123.jpg` (a running number and the file's extension, lower-cased), `000000123.cls`
(the class index as text, when labelled) and `000000123.json` (`{"path", "label",
"sha256"}`). Beside each shard, its index (`core.tars.write_index`: member offsets, so an
item is read by offset); `shards.json` (wids's shard list, with the classes) is written last,
so a set with one is whole. Shards are written under a temporary name and renamed.

A rerun into the same --out is a no-op when the folder is unchanged (same files, sizes,
mtimes, labels and shard size: `shards.json` keeps their fingerprint); any other set there
is refused unless `overwrite`, so two sets are never mixed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mocoserve.core import tars
from mocoserve.core.errors import UserError
from mocoserve.core.files import path_text, replace_durably
from mocoserve.core.images import is_image_file, iter_image_files

SHARD_NAME = "shard-{:06d}.tar"
KEY_DIGITS = 9  # as img2dataset numbers its samples
# the files a set in --out is made of (what --overwrite may remove; nothing else is touched)
_OURS = re.compile(r"^(\.?shard-\d{6}\.tar(\.idx\.json)?(\.tmp)?|\.?shards\.json(\.tmp)?)$")


@dataclass
class ShardsWritten:
    """What `write_shards` did."""

    out: Path
    shards: list[str] = field(default_factory=list)  # absolute paths, in order
    samples: int = 0
    classes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    up_to_date: bool = False  # the set in --out was already this folder's


@dataclass(frozen=True)
class _Source:
    path: Path
    rel: str  # relative to the folder, as text
    label: str | None
    size: int
    mtime: int


def write_shards(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    shard_size: int = 10000,
    labels_from_folders: bool = False,
    overwrite: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ShardsWritten:
    """Write the images under `folder` as tar shards in `out` (see the module docstring)."""
    root, out = Path(folder), Path(out)
    if not root.is_dir():
        raise UserError(f"{path_text(root)} is not a folder")
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {path_text(out)} exists and is not a folder")
    if out.resolve() == root.resolve():
        raise UserError(f"--out {path_text(out)} is the image folder itself; give another folder")
    sources, skipped = _sources(root, out, labels_from_folders)
    if not sources:
        raise UserError(f"{path_text(root)} holds no image files")
    classes = sorted({s.label for s in sources if s.label is not None})
    fingerprint = _fingerprint(sources, shard_size, labels_from_folders)
    result = ShardsWritten(out.resolve(), classes=classes, skipped=skipped)
    if _same_set(out, fingerprint, result):
        return result
    _clear(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if on_start is not None:
        on_start(len(sources))
    class_index = {name: i for i, name in enumerate(classes)}
    counts: list[tuple[str, int]] = []
    samples = _readable(sources, result.skipped, on_progress)
    while True:
        shard = str(result.out / SHARD_NAME.format(len(counts)))
        n = _write_shard(shard, samples, shard_size, result.samples, class_index)
        if n == 0:
            break
        counts.append((shard, n))
        result.samples += n
    if not counts:
        raise UserError(f"no image under {path_text(root)} could be read")
    result.shards = [s for s, _ in counts]
    tars.write_shard_list(
        result.out / tars.SHARD_LIST,
        counts,
        classes=classes,
        source=fingerprint,
        shard_size=shard_size,
        skipped=len(result.skipped),
    )
    return result


def _sources(
    root: Path, out: Path, labels_from_folders: bool
) -> tuple[list[_Source], list[tuple[str, str]]]:
    """The folder's image files in the folder reader's order (so a set lists as the folder
    scans), and the other files, skipped."""
    inside = out.resolve()
    # --out below the folder is left out of it; --out above it holds it, and is not
    below = inside.is_relative_to(root.resolve())
    found, skipped = [], []
    for path in iter_image_files(root):
        if below and path.resolve().is_relative_to(inside):
            continue
        parts = path.relative_to(root).parts
        # ImageFolder's label, as the folder reader gives it: the top-level folder
        label = path_text(parts[0]) if labels_from_folders and len(parts) > 1 else None
        try:
            st = path.stat()
        except OSError as e:
            skipped.append((path_text(Path(*parts)), f"cannot read: {e.strerror or e}"))
            continue
        found.append(_Source(path, path_text(Path(*parts)), label, st.st_size, st.st_mtime_ns))
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d).resolve() != inside]
        for name in filenames:
            if not is_image_file(Path(name)):
                rel = path_text(Path(dirpath, name).relative_to(root))
                skipped.append((rel, "not an image file (by its extension)"))
    return found, skipped


def _fingerprint(sources: list[_Source], shard_size: int, labels: bool) -> str:
    h = hashlib.sha256(json.dumps([shard_size, labels]).encode())
    for s in sources:
        h.update(json.dumps([s.rel, s.label, s.size, s.mtime]).encode())
    return h.hexdigest()


def _same_set(out: Path, fingerprint: str, result: ShardsWritten) -> bool:
    """Whether `out` already holds this folder's set, whole (then `result` describes it)."""
    listed = out / tars.SHARD_LIST
    if not listed.is_file():
        return False
    try:
        data = json.loads(listed.read_bytes())
        if data["mocoserve"]["source"] != fingerprint:
            return False
        shards = tars.read_shard_list(listed)
        counts = [e["nsamples"] for e in data["shardlist"]]
    except (ValueError, KeyError, TypeError, UserError):
        return False
    for shard in shards:
        idx = tars.index_path(shard)
        try:
            size = json.loads(idx.read_bytes())["size"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if os.path.getsize(shard) != size:
            return False
    result.shards, result.samples, result.up_to_date = shards, sum(counts), True
    return True


def _clear(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty --out (another set, an unfinished one, other files) unless told
    to overwrite: then remove the set's own files, and only them."""
    if not out.is_dir():
        return
    entries = list(out.iterdir())
    if not entries:
        return
    if not overwrite:
        what = "another shard set" if (out / tars.SHARD_LIST).is_file() else "files"
        raise UserError(
            f"--out {path_text(out)} already holds {what} (not this folder's set, or an "
            "unfinished one); give an empty folder, or --overwrite to replace the set"
        )
    for entry in entries:
        if entry.is_file() and _OURS.match(entry.name):
            entry.unlink()


def _readable(
    sources: list[_Source],
    skipped: list[tuple[str, str]],
    on_progress: Callable[[int], None] | None,
) -> Iterator[tuple[_Source, bytes]]:
    """Each source's bytes, if they are readable and an image (by its header); the rest
    skipped, with the reason."""
    for s in sources:
        try:
            data = s.path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                image.size  # noqa: B018  # the header parsed: an image Pillow knows
        except UnidentifiedImageError:
            skipped.append((s.rel, "not an image (Pillow cannot identify it)"))
            data = None
        except OSError as e:
            skipped.append((s.rel, f"cannot read: {e.strerror or e}"))
            data = None
        if on_progress is not None:
            on_progress(1)
        if data is not None:
            yield s, data


def _write_shard(
    shard: str,
    samples: Iterator[tuple[_Source, bytes]],
    shard_size: int,
    first: int,
    class_index: dict[str, int],
) -> int:
    """Up to `shard_size` samples to `shard` (a temp name, renamed), and its index beside
    it; how many were written (0: none left, nothing written)."""
    tmp = Path(shard).with_name(f".{Path(shard).name}.tmp")
    rows: list[tars.TarSample] = []
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for source, data in samples:
            key = f"{first + len(rows):0{KEY_DIGITS}d}"
            member = f"{key}{source.path.suffix.lower()}"
            offset = _add(tar, member, data, source.mtime)
            rows.append(tars.TarSample(shard, key, member, offset, len(data), source.label))
            if source.label is not None:
                _add(tar, f"{key}.cls", str(class_index[source.label]).encode(), source.mtime)
            meta = {"path": source.rel, "label": source.label}
            meta["sha256"] = hashlib.sha256(data).hexdigest()
            _add(tar, f"{key}.json", json.dumps(meta).encode(), source.mtime)
            if len(rows) == shard_size:
                break
    if not rows:
        tmp.unlink()
        return 0
    replace_durably(tmp, shard)
    tars.write_index(shard, rows)
    return len(rows)


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime_ns: int) -> int:
    """Add a member; the offset of its data in the tar."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime_ns // 1_000_000_000, 0o444
    tar.addfile(info, io.BytesIO(data))
    # the data ends where the tar now is, padded to whole blocks (any header form)
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
