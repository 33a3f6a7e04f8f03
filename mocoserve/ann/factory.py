"""Which FAISS index a factory string makes, and what an index is: IVF or not, on disk or not.

Ids are store ids: IVF indexes keep them in their inverted lists, the others (Flat, HNSW) in
an `IndexIDMap2`, so an index can be patched (ids removed and added) to agree with the store.
Vectors are L2-normalised and scored by inner product.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import faiss
import numpy as np

from mocoserve.core.errors import UserError

METRIC = faiss.METRIC_INNER_PRODUCT

Blocks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]  # () -> (ids, vectors) blocks
Gather = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # ids -> (vectors, found)


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2-normalised float32 copy."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


def new_index(factory: str, dim: int) -> faiss.Index:
    """An empty index for the factory string; a clear error if FAISS rejects it.

    IVF indexes keep our ids in their inverted lists (they remove by id without
    renumbering); the others (Flat, HNSW) sit in an `IndexIDMap2`.
    """
    try:
        if is_ivf_factory(factory):
            index = faiss.index_factory(dim, factory, METRIC)
        else:
            index = faiss.index_factory(dim, f"IDMap2,{factory}", METRIC)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1][:200]
        raise UserError(
            f"--index-type {factory!r} is not auto, flat, ivf, hnsw or a FAISS factory string "
            f"FAISS can build ({reason})"
        ) from None
    return index


def is_ivf_factory(factory: str) -> bool:
    """Whether the factory string makes an IVF index."""
    return any(part.startswith("IVF") for part in factory.split(","))


def base_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF part of an index, or None."""
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def inner(index: faiss.Index) -> faiss.Index:
    """The index under an IDMap2 (or the index itself), downcast."""
    return faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap) else index)


def exact_codes(index: faiss.Index) -> bool:
    """Whether the index scores candidates with the full float vectors (nothing to re-rank)."""
    ivf = base_ivf(index)
    if ivf is not None:
        return isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFlat)
    base = inner(index)
    return isinstance(base, faiss.IndexFlat) or (
        # HNSW's storage comes back as a plain faiss.Index: downcast it to see its codes
        isinstance(base, faiss.IndexHNSW)
        and isinstance(faiss.downcast_index(base.storage), faiss.IndexFlat)
    )


def on_disk(index: faiss.Index) -> bool:
    """Whether the index's inverted lists live in a file (`OnDiskInvertedLists`)."""
    ivf = base_ivf(index)
    return ivf is not None and isinstance(
        faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists
    )
