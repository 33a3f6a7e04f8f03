"""IVF inverted lists in a file (`OnDiskInvertedLists`), memory-mapped to search.

After the FAISS wiki's "indexes that do not fit in RAM": built in pieces and merged into one
lists file. On-disk lists are never edited in place (FAISS's removal from them is not safe,
and readers map the old file): a change makes a new lists file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.inspect_tools import get_invlist

from mocoserve.ann.factory import base_ivf
from mocoserve.ann.io import quiet_stdout
from mocoserve.ann.sync import add_blocks

PIECE_ROWS = 1 << 20  # vectors per piece file when building on-disk lists


def fill_on_disk(
    index: faiss.Index,
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    lists_path: str | Path,
    base: faiss.Index | None = None,
    drop: np.ndarray | None = None,
) -> faiss.Index:
    """`index` (trained, empty) with inverted lists stored in `lists_path`: every block
    added, plus `base`'s entries without the ids in `drop` when given.

    Entries go into empty in-memory copies of the index, written as piece files of up to
    PIECE_ROWS vectors beside `lists_path`; the pieces (memory-mapped) are merged into the
    lists file in one pass and deleted. Memory stays one piece's worth.
    """
    lists_path = Path(lists_path)
    pieces: list[Path] = []
    sources = []
    held: list[faiss.Index] = []
    try:
        if base is not None:
            for piece in _kept_pieces(index, base, drop):
                pieces.append(_write_piece(piece, lists_path, len(pieces)))
        piece = None
        for ids, vectors in blocks:
            if piece is None:
                piece = empty_like(index)
            add_blocks(piece, ids, vectors)
            if piece.ntotal >= PIECE_ROWS:
                pieces.append(_write_piece(piece, lists_path, len(pieces)))
                piece = None
        if piece is not None and piece.ntotal:
            pieces.append(_write_piece(piece, lists_path, len(pieces)))
        # not contrib.ondisk.merge_ondisk: it disowns the pieces' mapped lists, so they are
        # never unmapped and the deleted piece files hold their disk space until exit
        for path in pieces:
            mapped = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
            held.append(mapped)
            sources.append(base_ivf(mapped).invlists)
        ivf = base_ivf(index)
        lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists_path))
        with quiet_stdout():
            if sources:
                merge_lists(lists, sources)
        return attach_lists(index, lists)
    finally:
        del held
        for path in pieces:
            path.unlink(missing_ok=True)


def _kept_pieces(index: faiss.Index, base: faiss.Index, drop: np.ndarray | None):
    """In-memory copies of `index` holding `base`'s entries except `drop`, list by list,
    about PIECE_ROWS entries each."""
    drop = np.sort(np.asarray(drop if drop is not None else [], dtype=np.int64))
    source = base_ivf(base).invlists
    piece, rows = empty_like(index), 0
    for i in range(base_ivf(base).nlist):
        if not source.list_size(i):
            continue
        ids, codes = get_invlist(source, i)  # copies: (size,) int64, (size, code_size) uint8
        if len(drop):
            at = np.minimum(np.searchsorted(drop, ids), len(drop) - 1)
            keep = drop[at] != ids
            ids, codes = ids[keep], np.ascontiguousarray(codes[keep])
        if len(ids):
            base_ivf(piece).invlists.add_entries(
                i, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes)
            )
            rows += len(ids)
        if rows >= PIECE_ROWS:
            base_ivf(piece).ntotal = piece.ntotal = rows
            yield piece
            piece, rows = empty_like(index), 0
    if rows:
        base_ivf(piece).ntotal = piece.ntotal = rows
        yield piece


def _write_piece(piece: faiss.Index, lists_path: Path, number: int) -> Path:
    path = lists_path.with_name(f".{lists_path.name}.piece-{number}")
    faiss.write_index(piece, str(path))
    return path


def merge_lists(target: faiss.InvertedLists, sources: list[faiss.InvertedLists]) -> int:
    """Append every source's entries to `target`, list by list (ids kept); entries added."""
    found = faiss.InvertedListsPtrVector()
    for source in sources:
        found.push_back(source)
    return target.merge_from_multiple(found.data(), found.size(), False)


def attach_lists(index: faiss.Index, lists: faiss.InvertedLists) -> faiss.Index:
    """The index with these inverted lists (which it then owns) and its counts updated."""
    ivf = base_ivf(index)
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    total = sum(lists.list_size(i) for i in range(ivf.nlist))
    ivf.ntotal = index.ntotal = total
    return index


def empty_like(index: faiss.Index) -> faiss.Index:
    """A trained, empty copy of an IVF index (with in-memory lists), whatever its lists are.

    `faiss.clone_index` cannot copy on-disk lists; the lists are swapped for an empty
    array for the copy and put back.
    """
    ivf = base_ivf(index)
    saved, owned, counts = ivf.invlists, ivf.own_invlists, (ivf.ntotal, index.ntotal)
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.own_invlists = False
    ivf.replace_invlists(empty, False)
    ivf.ntotal = index.ntotal = 0
    try:
        return faiss.clone_index(index)
    finally:
        ivf.replace_invlists(saved, owned)
        ivf.ntotal, index.ntotal = counts


def to_memory(index: faiss.Index) -> faiss.Index:
    """A copy of an IVF index with its lists (on disk or not) in memory."""
    out = empty_like(index)
    source, target = base_ivf(index).invlists, base_ivf(out).invlists
    for i in range(base_ivf(index).nlist):
        size = source.list_size(i)
        if size:
            ids, codes = get_invlist(source, i)
            target.add_entries(i, size, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    base_ivf(out).ntotal = out.ntotal = index.ntotal
    return out


def patch_on_disk(
    index: faiss.Index,
    stale: np.ndarray,
    missing: Iterable[tuple[np.ndarray, np.ndarray]],
    lists_path: str | Path,
) -> faiss.Index:
    """A new index whose lists (in the new file `lists_path`) are `index`'s plus `missing`,
    without `stale`; `index` and its lists file are left untouched (readers keep them)."""
    return fill_on_disk(empty_like(index), missing, lists_path, base=index, drop=stale)
