"""Exact neighbours, recall, and tuning: the quickest search settings that reach a recall."""

from __future__ import annotations

import math
import time

import faiss
import numpy as np

from mocoserve.ann.factory import METRIC, Blocks, Gather, base_ivf, exact_codes
from mocoserve.ann.params import SearchSettings, param_names
from mocoserve.ann.search import Searcher
from mocoserve.ann.sync import ids_of

RECALL_TARGET = 0.95  # IVF/HNSW: search parameters are raised until recall@10 reaches this
K_FACTORS = (1, 2, 4, 8, 16, 32)  # re-rank k * k_factor candidates of compressed codes


def exact_knn(queries: np.ndarray, blocks: Blocks, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over all blocks: (scores, ids), each nq x k."""
    # not exhaustive_search.knn_ground_truth: it numbers rows by position across blocks
    # (a short block's -1 padding shifted into a real position); ours keeps the blocks' ids
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for ids, vectors in blocks():
        scores, pos = faiss.knn(queries, vectors, min(k, len(vectors)), metric=METRIC)
        found = np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)
        if scores.shape[1] < k:  # pad a short block
            pad = k - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            found = np.pad(found, ((0, 0), (0, pad)), constant_values=-1)
        heap.add_result(np.ascontiguousarray(scores), np.ascontiguousarray(found))
    heap.finalize()
    return heap.D, heap.I


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of `truth` that appears in the same row of `found`."""
    hits = [
        len(set(f.tolist()) & set(t.tolist()) - {-1}) for f, t in zip(found, truth, strict=True)
    ]
    sizes = [len(set(t.tolist()) - {-1}) for t in truth]
    return float(sum(hits) / max(1, sum(sizes)))


def tune(
    index: faiss.Index,
    blocks: Blocks,
    n: int,
    target: float = RECALL_TARGET,
    gather: Gather | None = None,
    queries: int = 1000,
    seed: int = 0,
    k: int = 10,
) -> tuple[SearchSettings, float | None, float | None]:
    """The quickest search settings whose recall@k reaches `target`; (settings, recall, qps).

    Queries are indexed vectors whose own match is dropped from both result lists, so they
    behave as held-out queries; truth is exact search over the stored vectors. nprobe
    (IVF) or efSearch (HNSW) runs through powers of two for each re-rank factor (compressed
    codes only, and only with `gather`) until the target is met or recall stops rising;
    the setting with the most queries/s that meets the target, with two standard errors of
    the measurement to spare, wins (the best recall if none does). Flat is exact: nothing
    to tune.
    """
    names = param_names(index)
    if not names or n == 0:
        return SearchSettings(), None, None
    stored = ids_of(index)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(stored), size=min(queries, len(stored)), replace=False))
    query_ids = stored[pick]
    if gather is not None:  # random reads, not a pass over every block
        q, _ = gather(query_ids)
    else:
        q = _gather(blocks, query_ids)
    _, truth = exact_knn(q, blocks, k + 1)
    truth = _drop_self(truth, query_ids, k)
    ivf = base_ivf(index)
    limit = ivf.nlist if ivf is not None else 4096
    factors = K_FACTORS if gather is not None and not exact_codes(index) else (1,)
    # meet the target with two standard errors to spare, so fresh queries meet it too
    # (1,000 queries x 10 neighbours: 0.0044 at 0.95)
    goal = min(1.0, target + 2 * math.sqrt(target * (1 - target) / (len(q) * k)))
    tried: list[tuple[float, float, SearchSettings]] = []  # (recall, qps, settings)
    ceiling = limit
    for factor in factors:
        value, last = 1 if ivf is not None else 16, -1.0
        while value <= ceiling:
            settings = _settings_for(names, value, factor)
            searcher = Searcher(index, settings, "cpu", gather)
            start = time.perf_counter()
            _, found = searcher.search(q, k + 1)
            qps = len(q) / max(time.perf_counter() - start, 1e-9)
            recall = recall_at(_drop_self(found, query_ids, k), truth)
            tried.append((recall, qps, settings))
            if recall >= goal:
                ceiling = value  # a larger factor is only worth it at a smaller nprobe
                break
            if recall - last < 0.002 and value >= 8:
                break  # the codes, not the probes, limit recall: a larger factor may help
            last, value = recall, value * 2
    met = [t for t in tried if t[0] >= goal]
    recall, qps, settings = (
        max(met, key=lambda t: t[1]) if met else max(tried, key=lambda t: (t[0], t[1]))
    )
    return settings, recall, qps


def _settings_for(names: dict[str, int], value: int, factor: int) -> SearchSettings:
    if "nprobe" in names:
        ef = max(64, 2 * value) if "quantizer_efSearch" in names else None
        return SearchSettings(value, ef, factor)
    return SearchSettings(None, value, factor)


def _gather(blocks: Blocks, wanted: np.ndarray) -> np.ndarray:
    """The vectors with these ids, in the order given."""
    rows: dict[int, np.ndarray] = {}
    for ids, vectors in blocks():
        for i in np.flatnonzero(np.isin(ids, wanted)):
            rows[int(ids[i])] = vectors[i].copy()  # a view would keep the whole block alive
    return np.stack([rows[int(i)] for i in wanted]).astype(np.float32)


def _drop_self(found: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(found), k), -1, dtype=np.int64)
    for row, (ids, own) in enumerate(zip(found, query_ids, strict=True)):
        kept = [i for i in ids.tolist() if i != own][:k]
        out[row, : len(kept)] = kept
    return out
