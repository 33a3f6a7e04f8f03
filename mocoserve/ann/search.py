"""Searching an index: on the CPU, or on every visible GPU (replicated or sharded), with
compressed codes re-ranked by the stored vectors, hidden ids and extra vectors beside it."""

from __future__ import annotations

import faiss
import numpy as np

from mocoserve.ann.factory import Gather, base_ivf, exact_codes, inner, new_index
from mocoserve.ann.params import SearchSettings, apply_settings, search_params
from mocoserve.ann.sync import ids_of
from mocoserve.core.errors import UserError

GPU_MAX_K = 2048  # FAISS GPU k-selection limit (also nprobe's)
GPU_QUERY_CHUNK = 8192  # queries per GPU search call, below FAISS GPU's temporary-memory limits


def gpu_layout(index_bytes: int, free_per_gpu: list[int], headroom: float = 1.3) -> str | None:
    """How to put an index of `index_bytes` on these GPUs: 'replicate' (a copy on each: the
    most queries/s) when one GPU holds it, 'shard' (a slice on each) when all of them do
    together, else None (search on the CPU)."""
    if not free_per_gpu:
        return None
    need = index_bytes * headroom
    if need <= min(free_per_gpu):
        return "replicate"
    if need / len(free_per_gpu) <= min(free_per_gpu):
        return "shard"
    return None


def _free_gpu_memory() -> list[int]:
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    except (ImportError, RuntimeError):  # no usable CUDA: search on the CPU
        return []
    return []


def index_bytes(index: faiss.Index) -> int:
    """Bytes the index would take in memory (its serialized size, lists included)."""
    ivf = base_ivf(index)
    if ivf is not None:
        lists = ivf.invlists
        codes = sum(lists.list_size(i) for i in range(ivf.nlist)) * (ivf.code_size + 8)
        return codes + ivf.quantizer.ntotal * ivf.d * 4
    base = inner(index)
    return index.ntotal * (base.d * 4 + 8)


def rerank(
    queries: np.ndarray, candidates: np.ndarray, gather: Gather, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The top k of each row's candidates, scored with their stored float vectors."""
    flat = candidates.reshape(-1)
    unique, where = np.unique(flat, return_inverse=True)
    vectors, found = gather(unique)
    scores = np.full(candidates.shape, -np.inf, dtype=np.float32)
    for row in range(len(queries)):  # one small matrix-vector product a query
        at = where[row * candidates.shape[1] : (row + 1) * candidates.shape[1]]
        scores[row] = vectors[at] @ queries[row]
    scores[(candidates < 0) | ~found[where].reshape(candidates.shape)] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    ids = np.where(np.isfinite(top), np.take_along_axis(candidates, order, axis=1), -1)
    return top, ids


class Searcher:
    """Searches a CPU index; on every visible GPU when FAISS has them and the index allows.

    - `settings` as tuned (nprobe, efSearch, re-rank factor); `gather(ids)` reads stored
      vectors to re-rank compressed codes.
    - `hidden` ids are never returned and `extra` (ids, vectors) are searched besides the
      index: a reader of on-disk lists (which it must not change) that lags the store.
    - GPUs: replicated or sharded by `gpu_layout`, fp16 where `settings` allow; k or nprobe
      beyond FAISS GPU's 2,048 fall back to the CPU (never a silently clamped search).
    """

    def __init__(
        self,
        index: faiss.Index,
        settings: SearchSettings | None = None,
        device: str = "auto",
        gather: Gather | None = None,
        hidden: np.ndarray | None = None,
        extra: tuple[np.ndarray, np.ndarray] | None = None,
        gpu_fp16: bool = False,
    ):
        settings = settings or SearchSettings()
        self.index = index
        self.settings = settings
        # compressed codes: candidates re-ranked (and scored) with the stored vectors
        self.gather = gather if not exact_codes(index) else None
        self.hidden = np.asarray(hidden if hidden is not None else [], dtype=np.int64)
        self.extra = None
        if extra is not None and len(extra[0]):
            flat = new_index("Flat", index.d)
            flat.add_with_ids(np.ascontiguousarray(extra[1], dtype=np.float32), extra[0])
            self.extra = flat
        self.gpu_fp16 = gpu_fp16
        self.device_request = device
        apply_settings(index, settings)
        self.gpu = None
        self.gpus = 0
        self.layout: str | None = None
        self.refresh()
        if device == "cuda" and self.gpu is None:
            raise UserError("device cuda was asked for, but FAISS has no GPU for this index")

    @property
    def device(self) -> str:
        return "cuda" if self.gpu is not None else "cpu"

    def refresh(self) -> None:
        """Pick up additions and removals made to the CPU index."""
        self.id_map = ids_of(self.index) if isinstance(self.index, faiss.IndexIDMap) else None
        self.gpu = None
        if self.device_request in ("auto", "cuda") and faiss.get_num_gpus() > 0:
            self._to_gpus()

    def _to_gpus(self) -> None:
        base = self.index.index if isinstance(self.index, faiss.IndexIDMap) else self.index
        layout = gpu_layout(index_bytes(self.index), _free_gpu_memory())
        if layout is None:
            return
        try:
            options = faiss.GpuMultipleClonerOptions()
            options.shard = layout == "shard"
            options.useFloat16 = self.gpu_fp16
            gpu = faiss.index_cpu_to_all_gpus(base, co=options)
            space = faiss.GpuParameterSpace()
            space.initialize(gpu)
            apply_settings(gpu, self.settings, space, like=self.index)
        except (RuntimeError, AttributeError):  # no GPU version of this index (HNSW, ...)
            return
        self.gpu, self.layout, self.gpus = gpu, layout, faiss.get_num_gpus()

    def hide(self, ids: np.ndarray) -> None:
        """Never return these ids again (the store removed them after the index was read)."""
        self.hidden = np.union1d(self.hidden, np.asarray(ids, dtype=np.int64))

    def _gpu_can(self, k: int) -> bool:
        return self.gpu is not None and k <= GPU_MAX_K and (self.settings.nprobe or 0) <= GPU_MAX_K

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each nq x k; missing neighbours have id -1. `allowed`: only these."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        total = self.index.ntotal + (self.extra.ntotal if self.extra is not None else 0)
        k = max(1, int(k))
        if total == 0 or (allowed is not None and len(allowed) == 0):
            return (
                np.full((len(queries), k), -np.inf, dtype=np.float32),
                np.full((len(queries), k), -1, dtype=np.int64),
            )
        want = min(k, total if allowed is None else min(total, len(allowed)))
        # the factor was tuned for 10 neighbours: fewer never get fewer candidates
        fetch = min(max(want, 10) * self.settings.k_factor, total) if self.gather else want
        selector = self._selector(allowed)
        if selector is None and self._gpu_can(fetch):
            scores, ids = self._search_gpu(queries, fetch)
        else:
            params = search_params(self.index, self.settings, selector)
            scores, ids = self.index.search(queries, fetch, params=params)
        if self.extra is not None:
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
            more = self.extra.search(queries, min(fetch, self.extra.ntotal), params=params)
            scores, ids = _merge((scores, ids), more, fetch)
        if self.gather is not None:
            scores, ids = rerank(queries, ids, self.gather, want)
        return scores[:, :want], ids[:, :want]

    def _selector(self, allowed: np.ndarray | None) -> faiss.IDSelector | None:
        parts = []
        if allowed is not None:
            parts.append(faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64)))
        if len(self.hidden):
            hidden = faiss.IDSelectorBatch(self.hidden)
            parts.append(faiss.IDSelectorNot(hidden))
            parts[-1].referenced = hidden  # keep the wrapped selector alive
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        both = faiss.IDSelectorAnd(parts[0], parts[1])
        both.referenced = parts
        return both

    def _search_gpu(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = [], []
        for start in range(0, len(queries), GPU_QUERY_CHUNK):
            s, i = self.gpu.search(queries[start : start + GPU_QUERY_CHUNK], k)
            scores.append(s)
            ids.append(i)
        scores_all, ids_all = np.concatenate(scores), np.concatenate(ids)
        if self.id_map is not None:  # an IDMap2's base returns positions
            ids_all = np.where(ids_all >= 0, self.id_map[np.maximum(ids_all, 0)], -1)
        return scores_all, ids_all


def _merge(a, b, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k of two (scores, ids) result sets, row by row."""
    heap = faiss.ResultHeap(len(a[0]), k, keep_max=True)
    for scores, ids in (a, b):
        scores = np.ascontiguousarray(scores, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if scores.shape[1] < k:
            pad = k - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        heap.add_result(scores, ids)
    heap.finalize()
    return heap.D, heap.I
