"""Tar shards (WebDataset's layout, img2dataset's output): naming them, listing their samples,
reading one member's bytes at its offset.

A shard is a plain tar whose members are grouped into samples by key: `a/b/000123.jpg`,
`a/b/000123.json` and `a/b/000123.cls` are the `jpg`, `json` and `cls` parts of sample
`a/b/000123` (WebDataset's rule: the key is the name up to the first dot of its last part).
A sample's image is its first part with an image extension.

`mocoserve shards` also writes, beside each shard, an index (`shard-000000.tar.idx.json`:
the shard's size and every sample's key, image member, data offset, size and label) and a
list of the set (`shards.json`, in wids's shard-list format, with each shard's sample count),
so training knows the length without reading the tars and a served item is read by offset.
A shard without an index (img2dataset's) is listed by reading its member headers (tarfile
seeks over the data); an index whose shard has changed size is refused by name, and so is a
shard that lists another number of samples than shards.json records for it.

An indexed tar item is named by one text key, `tar:<shard>//<member>` (`item_key`): the
folder reader's keys are absolute paths, so it never makes one; a resolved shard path never
holds `//` (and where a pipe: url does, it is escaped), so `split_item_key` finds the shard.
Every key of a shard starts with `tar:<shard>/`, so the shard's key (`shard_key`) is the
root that covers its members, the way a folder covers its files.

Sources are local files, brace patterns (`shard-{000000..000127}.tar`, expanded by
braceexpand as WebDataset does), lists of them, a folder of shards, a `shards.json`, or
`pipe:` commands (read as a stream through WebDataset's gopen: no offsets, no index).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mocoserve.core.errors import UserError
from mocoserve.core.files import path_text
from mocoserve.core.images import IMAGE_EXTENSIONS
from mocoserve.core.streams import PIPE, STALL_SECONDS, finish, open_stream

INDEX_SUFFIX = ".idx.json"  # beside the shard: shard-000000.tar.idx.json
SHARD_LIST = "shards.json"  # the set: wids's shard-list format
INDEX_KIND = "mocoserve-shard-index"
INDEX_VERSION = 1
WIDS_KIND = "wids-shard-index-v1"
KEY_PREFIX = "tar:"  # an item key from a shard: tar:<shard>//<member>
KEY_SEP = "//"
# a json member larger than this is not a label record (img2dataset's are ~1 KiB)
MAX_JSON_BYTES = 1 << 20


@dataclass(frozen=True)
class TarSample:
    """One sample of a shard: where its image's bytes lie, and its label if it has one."""

    shard: str  # the shard's path (absolute) or pipe: url, as given
    key: str  # WebDataset's sample key (member name up to the first dot of its last part)
    member: str  # the image member's name
    offset: int  # byte offset of the member's data in the tar (-1 for a pipe: stream)
    size: int  # bytes of the member's data
    label: str | None = None  # a class name: the `cls` part, or a json field


@dataclass
class ShardListing:
    """A shard's samples, in tar order, with what went wrong while listing it."""

    shard: str
    size: int  # bytes of the tar file (-1 for a pipe: stream)
    mtime: int  # ns (0 for a pipe: stream)
    samples: list[TarSample] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (key or shard, reason)
    from_index: bool = False


def is_shard_spec(spec: str | os.PathLike) -> bool:
    """Whether an input names tar shards rather than an image folder."""
    text = str(spec)
    if text.startswith(PIPE):
        return True
    if text.endswith((".tar", SHARD_LIST)) or ("{" in text and ".tar" in text):
        return True
    p = Path(text)
    if not p.is_dir():
        return False
    if (p / SHARD_LIST).is_file():
        return True
    # a folder of shards: .tar files at its top and no image beside them
    try:
        names = [e.name for e in os.scandir(p) if e.is_file()]
    except OSError:
        return False
    image = any(f".{n.rsplit('.', 1)[-1].lower()}" in IMAGE_EXTENSIONS for n in names if "." in n)
    return not image and any(n.endswith(".tar") for n in names)


def _escape_shard(shard: str) -> str:
    # '%' first, then each '//' (a pipe: url's s3://) and a trailing '/': no '//' is left
    text = shard.replace("%", "%25").replace("//", "/%2F")
    return text[:-1] + "%2F" if text.endswith("/") else text


def _unescape_shard(text: str) -> str:
    return re.sub(r"%(25|2F)", lambda m: "%" if m[1] == "25" else "/", text)


def shard_key(shard: str) -> str:
    """The key prefix of a shard's items: `tar:<shard>` (the root that covers them)."""
    return KEY_PREFIX + _escape_shard(shard)


def item_key(shard: str, member: str) -> str:
    """An item's key, as the index stores it: `tar:/abs/shard-000001.tar//000123.jpg`."""
    return f"{shard_key(shard)}{KEY_SEP}{member}"


def split_item_key(key: str) -> tuple[str, str] | None:
    """(shard, member) of a tar item's key; None for any other key (a file's path)."""
    if not key.startswith(KEY_PREFIX):
        return None
    head, sep, member = key[len(KEY_PREFIX) :].partition(KEY_SEP)
    return (_unescape_shard(head), member) if sep and member else None


def key_group(key: str) -> str:
    """What places a key in an index shard: a tar item's shard key (a tar's items stay
    together, so process shards get whole tars), else the key itself."""
    if key.startswith(KEY_PREFIX):
        head, sep, _ = key.partition(KEY_SEP)
        if sep:
            return head
    return key


def expand(specs: Sequence[str | os.PathLike]) -> list[str]:
    """Every shard the inputs name, each once, in order: brace patterns expanded, a folder of
    shards or a shards.json read as its list, local paths made absolute, pipe: kept as given.

    A local shard that does not exist is a UserError naming it.
    """
    import braceexpand  # WebDataset's own dependency: the same pattern rules as its urls

    out: dict[str, None] = {}
    for spec in specs:
        text = str(spec)
        if text.startswith(PIPE):
            for url in braceexpand.braceexpand(text):
                out[url] = None
            continue
        for item in braceexpand.braceexpand(text):
            if item.startswith(PIPE):  # {local.tar,pipe:cmd}: each item is its own kind
                out[item] = None
                continue
            for shard in _local_shards(Path(item)):
                out[shard] = None
    if not out:
        raise UserError(f"no tar shards in {', '.join(map(str, specs))}")
    return list(out)


def _local_shards(path: Path) -> list[str]:
    if path.is_dir():
        listed = path / SHARD_LIST
        if listed.is_file():
            return read_shard_list(listed)
        found = sorted(p for p in path.iterdir() if p.name.endswith(".tar") and p.is_file())
        if not found:
            raise UserError(f"{path_text(path)} holds no .tar shards")
        return [str(p.resolve()) for p in found]
    if path.name == SHARD_LIST:
        return read_shard_list(path)
    if not path.is_file():
        raise UserError(f"{path_text(path)} does not exist")
    return [str(path.resolve())]


def read_shard_list(path: str | os.PathLike) -> list[str]:
    """The shards a shards.json lists (wids's format; urls relative to its folder)."""
    return [shard for shard, _ in _shard_entries(Path(path))]


def shard_list_counts(path: str | os.PathLike) -> dict[str, int]:
    """shard -> the sample count a shards.json records for it (its `nsamples`); a shard
    listed without one (another tool's list) is left out."""
    return {shard: n for shard, n in _shard_entries(Path(path)) if _whole(n)}


def listed_counts(specs: Sequence[str | os.PathLike]) -> dict[str, int]:
    """shard -> its `nsamples`, for each shard that a shards.json among the inputs (or in a
    folder they name) lists with a count, as `expand` finds the lists; {} when none does."""
    import braceexpand

    counts: dict[str, int] = {}
    for spec in specs:
        text = str(spec)
        if text.startswith(PIPE):
            continue
        for item in braceexpand.braceexpand(text):
            p = Path(item)
            listed = p / SHARD_LIST if p.is_dir() else p if p.name == SHARD_LIST else None
            if listed is not None and listed.is_file():
                for shard, n in shard_list_counts(listed).items():
                    counts.setdefault(shard, n)  # the first list that names it, as expand
    return counts


def _shard_entries(p: Path) -> list[tuple[str, Any]]:
    """(shard, its entry's nsamples as given) of each url a shards.json lists."""
    data = _read_json(p, "shard list")
    entries = data.get("shardlist") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("url"), str) for e in entries
    ):
        raise UserError(f"{path_text(p)} is not a shard list (no shardlist of urls)")
    shards = []
    for e in entries:
        url = e["url"]
        if url.startswith(PIPE):  # a data file never runs a shell command
            raise UserError(
                f"{path_text(p)} lists {url!r}: a shard list names files; give pipe: "
                "commands on the command line"
            )
        shard = str((p.parent / url).resolve())
        if not Path(shard).is_file():
            raise UserError(f"{path_text(p)} lists {url}, which does not exist")
        shards.append((shard, e.get("nsamples")))
    return shards


def write_shard_list(
    path: str | os.PathLike, counts: Sequence[tuple[str, int]], **extra: Any
) -> None:
    """shards.json: wids's shard list ({url, nsamples}), urls relative to its folder."""
    p = Path(path)
    data = {
        "__kind__": WIDS_KIND,
        "wids_version": 1,
        "name": p.parent.name,
        "shardlist": [{"url": os.path.relpath(url, p.parent), "nsamples": n} for url, n in counts],
        "mocoserve": {"kind": INDEX_KIND, "version": INDEX_VERSION, **extra},
    }
    _write_json(p, data)


def sample_key(member: str) -> tuple[str, str]:
    """(key, part) of a member name, by WebDataset's rule: `a/b/0001.seg.png` -> (`a/b/0001`,
    `seg.png`)."""
    folder, _, base = member.rpartition("/")
    stem, dot, part = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, part if dot else ""


def _is_image_part(part: str) -> bool:
    return f".{part.rsplit('.', 1)[-1].lower()}" in IMAGE_EXTENSIONS


def index_path(shard: str | os.PathLike) -> Path:
    return Path(f"{shard}{INDEX_SUFFIX}")


def list_shard(
    shard: str, label_key: str | None = None, labels: bool = True, nsamples: int | None = None
) -> ShardListing:
    """A local shard's samples: from its index when there is one (and it matches the tar's
    size), else by reading the member headers. A truncated tar keeps the samples before
    the damage and records the failure; a sample without an image part is a failure.

    `label_key`: the json field holding the label (img2dataset's metadata); else the index's
    label, else json's "label", else the `cls` part. `labels=False`: offsets only (no label
    part is read). `nsamples`: the count shards.json records for the shard; a listing
    without failures of its own that finds another count is a UserError naming both (a
    damaged tar's failures already say why it lists fewer).
    """
    if shard.startswith(PIPE):
        raise UserError(f"{shard}: a pipe: stream has no offsets; it can only be streamed")
    st = _stat(shard)
    listing = ShardListing(shard, st.st_size, st.st_mtime_ns)
    idx = index_path(shard)
    if idx.is_file() and label_key is None:
        listing.samples = _samples_from_index(shard, idx, st.st_size)
        listing.from_index = True
        return _counted(listing, nsamples)
    try:
        with tarfile.open(shard, mode="r:") as tar:
            _scan_members(tar, listing, label_key, labels)
    except tarfile.ReadError as e:
        if not listing.samples and not listing.failures:
            listing.failures.append((shard, f"not a readable tar ({_first_line(e)})"))
    return _counted(listing, nsamples)


def _counted(listing: ShardListing, nsamples: int | None) -> ShardListing:
    """The listing, unless it finds another count than shards.json's with no failure to
    say why: then the shard or its index changed after the list was written."""
    n = len(listing.samples)
    if nsamples is None or n == nsamples or listing.failures:
        return listing
    raise UserError(
        f"{path_text(listing.shard)}: lists {n} samples, {SHARD_LIST} says {nsamples} (the "
        f"shard or its index changed since {SHARD_LIST} was written; rerun mocoserve shards)"
    )


def _stat(shard: str) -> os.stat_result:
    try:
        return os.stat(shard)
    except FileNotFoundError:
        raise UserError(f"{path_text(shard)} does not exist") from None


def _scan_members(
    tar: tarfile.TarFile, listing: ShardListing, label_key: str | None, labels: bool = True
) -> None:
    """Group a tar's members into samples, in order; the data of small label parts is read."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    dup: set[str] = set()
    try:
        for info in tar:  # the headers only: tarfile seeks over each member's data
            if not info.isfile():
                continue
            key, part = sample_key(info.name)
            if part:
                parts = groups.setdefault(key, {})
                if part in parts:  # which copy is the sample's is unknowable: neither is
                    dup.add(key)
                parts[part] = info
        if not _ends_cleanly(tar):
            listing.failures.append((listing.shard, "truncated tar (no end-of-archive marker)"))
    except (tarfile.ReadError, EOFError, OSError) as e:
        listing.failures.append((listing.shard, f"truncated or damaged tar ({_first_line(e)})"))
    size = listing.size
    for key, parts in groups.items():
        if key in dup:
            listing.failures.append((key, "the tar holds this sample's members more than once"))
            continue
        image = next((p for p in parts if _is_image_part(p)), None)
        if image is None:
            listing.failures.append((key, f"no image part (has {', '.join(sorted(parts))})"))
            continue
        info = parts[image]
        if info.offset_data + info.size > size:
            listing.failures.append((key, f"{info.name} is cut short by the end of the tar"))
            continue
        label = _label(tar, parts, label_key, key, listing) if labels else None
        listing.samples.append(
            TarSample(listing.shard, key, info.name, info.offset_data, info.size, label)
        )


def _ends_cleanly(tar: tarfile.TarFile) -> bool:
    """Whether two zero blocks follow the last member (tarfile stops quietly at a cut)."""
    f = tar.fileobj
    assert f is not None
    f.seek(tar.offset)
    return f.read(2 * tarfile.BLOCKSIZE) == bytes(2 * tarfile.BLOCKSIZE)


def _label(
    tar: tarfile.TarFile,
    parts: dict[str, tarfile.TarInfo],
    label_key: str | None,
    key: str,
    listing: ShardListing,
) -> str | None:
    """The sample's label: json[label_key] when asked for; else json's "label" (a class name,
    as `mocoserve shards` writes it), else the cls part (a class index as text)."""
    try:
        if "json" in parts and parts["json"].size <= MAX_JSON_BYTES:
            value = _json_label(_member_bytes(tar, parts["json"]), label_key or "label")
            if value is not None or label_key is not None:
                return value
        if label_key is None and "cls" in parts and parts["cls"].size <= MAX_JSON_BYTES:
            return _member_bytes(tar, parts["cls"]).decode("utf-8").strip() or None
    except (UnicodeDecodeError, json.JSONDecodeError, OSError, tarfile.TarError) as e:
        listing.failures.append((key, f"unreadable label part ({_first_line(e)})"))
    return None


def _json_label(data: bytes, field: str) -> str | None:
    meta = json.loads(data)
    value = meta.get(field) if isinstance(meta, dict) else None
    return None if value is None else str(value)


def _member_bytes(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(info)
    if f is None:
        raise OSError(f"{info.name} is not a file")
    return f.read()


def read_member(shard: str, offset: int, size: int, member: str | None = None) -> bytes:
    """The `size` bytes at `offset` of a local shard; a short read is an OSError (a shard
    cut or replaced since it was listed), never truncated bytes."""
    with open(shard, "rb") as f:
        return pread_member(f.fileno(), shard, offset, size, member)


def pread_member(fd: int, shard: str, offset: int, size: int, member: str | None = None) -> bytes:
    """A member's data read with its header, in one pread: an OSError unless the block
    before `offset` is a regular member's header of `size` bytes (and, where the name fits a
    plain header, named `member`). An index tampered with, or a shard rewritten at the same
    size, points elsewhere: refused, never other bytes."""
    if not _whole(offset, size) or offset < tarfile.BLOCKSIZE:
        raise OSError(f"{shard}: no member's data can start at offset {offset}")
    data = os.pread(fd, size + tarfile.BLOCKSIZE, offset - tarfile.BLOCKSIZE)
    if len(data) != size + tarfile.BLOCKSIZE:
        raise OSError(f"{shard}: {size} bytes at offset {offset} are past the end of the tar")
    if not _header_names(data[: tarfile.BLOCKSIZE], size, member):
        what = member if member is not None else f"a {size}-byte member"
        raise OSError(f"{shard}: offset {offset} is not {what}'s data (the shard changed)")
    return data[tarfile.BLOCKSIZE :]


def _header_names(block: bytes, size: int, member: str | None) -> bool:
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")  # checks its checksum
    except tarfile.HeaderError:
        return False
    # pax moves a size over 8 GiB, and a long or non-ASCII name, into an extension header
    sized = info.size == size or (info.size == 0 and size >= 8**11)
    plain = member is None or len(member.encode("utf-8", "surrogateescape")) > 99
    named = plain or not member.isascii() or info.name == member
    return info.isfile() and sized and named


def write_index(shard: str | os.PathLike, samples: Sequence[TarSample]) -> Path:
    """The shard's index beside it (written whole, then renamed into place)."""
    shard = str(shard)
    data = {
        "kind": INDEX_KIND,
        "version": INDEX_VERSION,
        "shard": os.path.basename(shard),
        "size": os.path.getsize(shard),
        "samples": [[s.key, s.member, s.offset, s.size, s.label] for s in samples],
    }
    path = index_path(shard)
    _write_json(path, data)
    return path


def _whole(*values: Any) -> bool:
    return all(type(v) is int and v >= 0 for v in values)  # bool is no offset


def _samples_from_index(shard: str, idx: Path, size: int) -> list[TarSample]:
    data = _read_json(idx, "shard index")
    if not isinstance(data, dict) or data.get("kind") != INDEX_KIND:
        raise UserError(f"{path_text(idx)} is not a mocoserve shard index")
    if data.get("version") != INDEX_VERSION:
        raise UserError(
            f"{path_text(idx)} is shard index version {data.get('version')!r}; "
            f"this mocoserve reads version {INDEX_VERSION}"
        )
    if data.get("size") != size:
        raise UserError(
            f"{path_text(shard)} is {size} bytes but its index {idx.name} was written for "
            f"{data.get('size')}; the shard changed: rerun mocoserve shards or delete the index"
        )
    rows = data.get("samples")
    samples = []
    try:
        for key, member, offset, length, label in rows:  # type: ignore[union-attr]
            ok = isinstance(key, str) and isinstance(member, str) and _whole(offset, length)
            ok = ok and (label is None or isinstance(label, str))
            # a member's data starts on a block, after its header
            if not ok or offset < tarfile.BLOCKSIZE or offset % tarfile.BLOCKSIZE:
                raise ValueError(key)
            if offset + length > size:
                raise ValueError(key)
            samples.append(TarSample(shard, key, member, offset, length, label))
    except (TypeError, ValueError):
        raise UserError(
            f"{path_text(idx)} is damaged (a sample row is not key, member, "
            "offset, size, label within the shard)"
        ) from None
    return samples


def stream_samples(
    url: str, label_key: str | None = None, stall_s: float = STALL_SECONDS
) -> Iterator[tuple[TarSample, bytes]]:
    """A shard read front to back (local path or pipe: command, see core.streams: a command
    that stalls for `stall_s` or fails is an OSError) through WebDataset's tar iterator: each
    sample with its image's bytes, labelled as `list_shard` labels. Offsets are -1: a stream
    has none."""
    # imported here: webdataset imports torch when it is installed
    from webdataset.tariterators import tar_file_iterator

    stream = open_stream(url, stall_s)
    try:
        current: str | None = None
        parts: dict[str, bytes] = {}
        for member in tar_file_iterator(stream):
            key, part = sample_key(member["fname"])
            if current is not None and key != current:
                yield from _streamed(url, current, parts, label_key)
                parts = {}
            current = key
            if part:
                parts[part] = member["data"]
        finish(stream)  # a failed or stalled command fails the shard before its last sample
        if current is not None:
            yield from _streamed(url, current, parts, label_key)
    finally:
        stream.close()


def _streamed(
    url: str, key: str, parts: dict[str, bytes], label_key: str | None
) -> Iterator[tuple[TarSample, bytes]]:
    image = next((p for p in parts if _is_image_part(p)), None)
    if image is None:
        return
    label = None
    try:
        if "json" in parts and len(parts["json"]) <= MAX_JSON_BYTES:
            label = _json_label(parts["json"], label_key or "label")
        if label is None and label_key is None and "cls" in parts:
            label = parts["cls"].decode("utf-8").strip() or None
    except (UnicodeDecodeError, json.JSONDecodeError):
        label = None  # the image is still the sample's; an unreadable label is no label
    name = f"{key}.{image}"
    yield TarSample(url, key, name, -1, len(parts[image]), label), parts[image]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path_text(path)} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path_text(path)} is not a {what} (not valid JSON)") from None


def _write_json(path: Path, data: Any) -> None:
    from mocoserve.core.files import replace_durably

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    replace_durably(tmp, path)
