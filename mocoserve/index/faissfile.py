"""The FAISS file of an index (`out.faiss`), from its store: read and made to agree, or built.

Readers repair what they read in memory (`load_faiss`); the writer also builds (`build_faiss`)
and saves. Both the reader and the writer use this module; neither imports the other for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from mocoserve.ann.build import Built, build
from mocoserve.ann.factory import base_ivf, inner, new_index, on_disk
from mocoserve.ann.io import read
from mocoserve.ann.sync import diff_ids, sync
from mocoserve.ann.tune import RECALL_TARGET
from mocoserve.index.catalog import CatalogMeta

if TYPE_CHECKING:
    from mocoserve.index.formats import Sidecar
    from mocoserve.index.store import ShardedStore

    Store = ShardedStore | Sidecar


def same_kind(current: str, target: str) -> bool:
    """Whether an index built as `current` can be kept for `target` (IVF: nlist within 2x)."""
    if current == target:
        return True
    pattern = re.compile(r"IVF(\d+)")
    a, b = pattern.search(current), pattern.search(target)
    return bool(
        a
        and b
        and pattern.sub("IVF", current) == pattern.sub("IVF", target)
        and 0.5 <= int(a[1]) / int(b[1]) <= 2.0
    )


def _factory_of(index: faiss.Index) -> str:
    """A coarse description to notice an index file that is not the one the catalog names."""
    ivf = base_ivf(index)
    if ivf is not None:
        return f"IVF{ivf.nlist}/{type(faiss.downcast_index(ivf)).__name__}/{ivf.code_size}"
    base = inner(index)
    kind = "Flat" if isinstance(base, faiss.IndexFlat) else type(base).__name__
    return f"{kind}/{base.metric_type}"


@dataclass
class Loaded:
    """The FAISS file as read, made to agree with the store.

    In memory, the index itself is patched. On-disk lists are never changed by a reader:
    ids the store no longer has are `hidden`, ids it gained are searched as `extra`.
    """

    index: faiss.Index | None
    repaired: bool = False
    hidden: np.ndarray | None = None
    extra: tuple[np.ndarray, np.ndarray] | None = None


EXTRA_LIMIT = 1_000_000  # a lagging on-disk reader holds at most this many new vectors (a
# large embed in progress: the rest wait for its build; removed ids are always hidden)


def load_faiss(store: Store, path: Path, factory: str, dim: int, patch: bool = True) -> Loaded:
    """The FAISS file, made to hold exactly the store's ids (see `Loaded`).

    Index None when the file is missing, unreadable or not of the kind the catalog names.
    `patch=False` leaves an on-disk index as read (the writer patches it into new lists).
    """
    if not dim:
        return Loaded(None)
    index = read(path, dim)
    if index is None or _factory_of(index) != _factory_of(new_index(factory, dim)):
        return Loaded(None, True)
    if not on_disk(index):
        return Loaded(index, sync(index, store.ids(), store.vectors) > 0)
    if not patch:
        return Loaded(index)
    stale, missing = diff_ids(index, store.ids())
    extra = None
    if 0 < len(missing) <= EXTRA_LIMIT:  # more: searchable from the writer's next build
        vectors, found = store.gather(missing)
        extra = (missing[found], vectors[found])
    return Loaded(index, bool(len(stale) or len(missing)), stale, extra)


def build_faiss(
    store: Store,
    factory: str,
    target: float = RECALL_TARGET,
    lists_path: Path | None = None,
) -> Built:
    """A new FAISS index from every vector of the store (trained on a sample, tuned)."""
    n, dim = len(store), CatalogMeta.of(store).dim
    if n == 0:
        factory, lists_path = "Flat", None  # nothing to train on; the next build picks again
    ids = store.ids()
    rng = np.random.default_rng(0)

    def sample(m: int) -> np.ndarray:
        picked = np.sort(rng.choice(ids, size=min(m, len(ids)), replace=False))
        vectors, _ = store.gather(picked)
        return vectors

    return build(factory, dim, store.vectors, sample, n, target, store.gather, lists_path)
