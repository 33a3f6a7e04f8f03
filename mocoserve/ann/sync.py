"""The ids an index holds, and patching them to agree with the store: add in bounded chunks,
remove by id, or empty and refill where a base cannot remove."""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

from mocoserve.ann.factory import base_ivf, inner


def ids_of(index: faiss.Index) -> np.ndarray:
    """The ids an index holds (an IDMap2's map, or an IVF's inverted lists)."""
    if isinstance(index, faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
    ivf = base_ivf(index)
    if ivf is None:
        raise TypeError(f"no ids in a {type(index).__name__}")
    lists = ivf.invlists
    parts = []
    # not inspect_tools.get_invlist: it copies each list's codes too (all of an on-disk file)
    for i in range(ivf.nlist):
        size = lists.list_size(i)
        if size:
            ptr = lists.get_ids(i)
            parts.append(faiss.rev_swig_ptr(ptr, size).copy())
            lists.release_ids(i, ptr)
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def add_rows(index: faiss.Index) -> int:
    """Rows per add call that keep FAISS's working memory near 32 MB.

    Encoding with a product quantizer builds an n x M x ksub float table per call (268 MB
    for 16k rows of PQ16): PQ indexes are fed in chunks; others take 64k rows at a time.
    """
    base = base_ivf(index)
    base = faiss.downcast_index(base) if base is not None else inner(index)
    pq = getattr(base, "pq", None)
    if pq is None:
        return 65536
    return max(256, (32 << 20) // (pq.M * pq.ksub * 4))


def add_blocks(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray) -> None:
    """add_with_ids in chunks of `add_rows` (bounded memory, same result)."""
    step = add_rows(index)
    for start in range(0, len(ids), step):
        index.add_with_ids(
            np.ascontiguousarray(vectors[start : start + step], dtype=np.float32),
            np.ascontiguousarray(ids[start : start + step], dtype=np.int64),
        )


def diff_ids(index: faiss.Index, wanted_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stale: held but not wanted, missing: wanted but not held)."""
    held = ids_of(index)
    wanted_ids = np.asarray(wanted_ids, dtype=np.int64)
    return (
        np.setdiff1d(held, wanted_ids, assume_unique=True),
        np.setdiff1d(wanted_ids, held, assume_unique=True),
    )


def sync(index: faiss.Index, wanted_ids: np.ndarray, vectors_for: Callable) -> int:
    """Patch an in-memory `index` to hold exactly `wanted_ids`; how many ids changed.

    `vectors_for(ids)` yields (ids, vectors) blocks. IVF indexes (our ids in their lists)
    and IDMap2 over a flat base remove by id; any other IDMap2 base (HNSW, or an IVF of an
    older file) is emptied, keeping its training, and refilled.
    """
    stale, missing = diff_ids(index, wanted_ids)
    if len(stale):
        if not isinstance(index, faiss.IndexIDMap) or isinstance(inner(index), faiss.IndexFlat):
            index.remove_ids(faiss.IDSelectorBatch(stale))
        else:
            index.reset()
            missing = np.asarray(wanted_ids, dtype=np.int64)
    if len(missing):
        for ids, vectors in vectors_for(missing):
            add_blocks(index, ids, vectors)
    return len(stale) + len(missing)
