"""FAISS helpers: choose, build, tune, patch, save and search an inner-product index.

Plain functions, numpy in and numpy out. Every index is an `IndexIDMap2` whose ids are
sidecar row ids, so it can be patched (ids removed and added) to agree with the sidecar.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from mocoserve.core.errors import UserError
from mocoserve.core.files import replace_durably

FLAT_LIMIT = 1_000_000  # auto: exact search up to this many vectors
RECALL_TARGET = 0.95  # auto IVF: nprobe is raised until recall@10 reaches this
GPU_MAX_K = 2048  # FAISS GPU k-selection limit (also nprobe's)
METRIC = faiss.METRIC_INNER_PRODUCT

Blocks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2-normalised float32 copy."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


def ivf_nlist(n: int) -> int:
    """The IVF list count for n vectors: about 4 * sqrt(n)."""
    return max(1, round(4 * math.sqrt(n)))


def choose_factory(index_type: str, n: int, flat_limit: int = FLAT_LIMIT) -> str:
    """FAISS factory string (without the IDMap2 prefix) for --index-type and n vectors."""
    kind = index_type.strip()
    if kind == "auto":
        kind = "flat" if n <= flat_limit else "ivf"
    if kind == "flat":
        return "Flat"
    if kind == "ivf":
        return f"IVF{ivf_nlist(n)},Flat"
    if kind == "hnsw":
        return "HNSW32,Flat"
    for prefix in ("IDMap2,", "IDMap,"):
        kind = kind.removeprefix(prefix)
    return kind


def new_index(factory: str, dim: int) -> faiss.IndexIDMap2:
    """An empty IDMap2 index for the factory string; a clear error if FAISS rejects it."""
    try:
        index = faiss.index_factory(dim, f"IDMap2,{factory}", METRIC)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1][:200]
        raise UserError(
            f"--index-type {factory!r} is not auto, flat, ivf, hnsw or a FAISS factory string "
            f"FAISS can build ({reason})"
        ) from None
    return index


def base_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF part of an index, or None."""
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def set_search_params(index: faiss.Index, nprobe: int | None, ef_search: int = 128) -> None:
    """Apply the tuned nprobe (IVF) and efSearch (HNSW) to a CPU index."""
    ivf = base_ivf(index)
    if ivf is not None and nprobe:
        ivf.nprobe = int(nprobe)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = ef_search


def ids_of(index: faiss.IndexIDMap2) -> np.ndarray:
    """The ids an IDMap2 index holds, in storage order."""
    return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)


def add_rows(index: faiss.Index) -> int:
    """Rows per add call that keep FAISS's working memory near 32 MB.

    Encoding with a product quantizer builds an n x M x ksub float table per call (268 MB
    for 16k rows of PQ16): PQ indexes are fed in chunks; others take 64k rows at a time.
    """
    base = base_ivf(index)
    inner = base if base is not None else faiss.downcast_index(getattr(index, "index", index))
    pq = getattr(faiss.downcast_index(inner), "pq", None) if inner is not None else None
    if pq is None:
        return 65536
    return max(256, (32 << 20) // (pq.M * pq.ksub * 4))


def add_blocks(index: faiss.IndexIDMap2, ids: np.ndarray, vectors: np.ndarray) -> None:
    """add_with_ids in chunks of `add_rows` (bounded memory, same result)."""
    step = add_rows(index)
    for start in range(0, len(ids), step):
        index.add_with_ids(
            np.ascontiguousarray(vectors[start : start + step], dtype=np.float32),
            np.ascontiguousarray(ids[start : start + step], dtype=np.int64),
        )


@dataclass
class Built:
    """An index and what tuning found."""

    index: faiss.IndexIDMap2
    factory: str
    nprobe: int | None = None
    recall_at_10: float | None = None


def build(
    factory: str,
    dim: int,
    blocks: Blocks,
    train_sample: Callable[[int], np.ndarray],
    n: int,
    tune_queries: int = 1000,
    seed: int = 0,
) -> Built:
    """Build an index from (ids, vectors) blocks; train it on a sample; tune IVF's nprobe.

    `blocks()` can be called more than once (tuning reads the vectors again for the exact
    neighbours); `train_sample(m)` returns m vectors drawn from the whole set.
    """
    index = new_index(factory, dim)
    if not index.is_trained:
        ivf = base_ivf(index)
        needed = ivf.nlist if ivf is not None else 1
        if n < needed:
            raise UserError(
                f"index {factory!r} needs at least {needed} vectors to train and there are {n}; "
                "use --index-type flat or a smaller nlist"
            )
        # FAISS wants 39+ points per centroid; 64 per list keeps k-means quick at 1M+.
        train(index, train_sample(min(n, max(needed * 64, 10_000))))
    for ids, vectors in blocks():
        add_blocks(index, ids, vectors)
    built = Built(index, factory)
    if base_ivf(index) is not None and n > 0:
        built.nprobe, built.recall_at_10 = tune_nprobe(index, blocks, n, tune_queries, seed)
    set_search_params(index, built.nprobe)
    return built


def train(index: faiss.IndexIDMap2, sample: np.ndarray, gpu: bool | None = None) -> None:
    """Train an index on a sample; an IVF-Flat's coarse quantizer by k-means on the GPU if any.

    IVF-Flat's training is exactly k-means of the sample into nlist centroids, so it runs
    through `faiss.Kmeans` (GPU when FAISS has one, falling back to the CPU) with the
    index's own clustering parameters (spherical for inner product, its niter and seed),
    the same centroids `index.train` would find; other factories use their own `train`.
    """
    inner = faiss.downcast_index(index.index)
    if not isinstance(inner, faiss.IndexIVFFlat) or inner.metric_type != METRIC:
        index.train(sample)
        return
    gpu = faiss.get_num_gpus() > 0 if gpu is None else gpu
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    cp = inner.cp
    params = {
        "niter": cp.niter,
        "seed": cp.seed,
        "spherical": True,  # IndexIVF does so for inner product: unit centroids
        "max_points_per_centroid": cp.max_points_per_centroid,
        "min_points_per_centroid": cp.min_points_per_centroid,
    }
    try:
        kmeans = faiss.Kmeans(inner.d, inner.nlist, gpu=gpu, **params)
        kmeans.train(sample)
    except (RuntimeError, AttributeError):
        if not gpu:
            raise
        kmeans = faiss.Kmeans(inner.d, inner.nlist, gpu=False, **params)
        kmeans.train(sample)
    inner.quantizer.add(kmeans.centroids)
    inner.is_trained = True
    index.is_trained = True


def exact_knn(queries: np.ndarray, blocks: Blocks, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over all blocks: (scores, ids), each nq x k."""
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


def tune_nprobe(
    index: faiss.IndexIDMap2, blocks: Blocks, n: int, queries: int, seed: int, k: int = 10
) -> tuple[int, float]:
    """Smallest power-of-two nprobe whose recall@k reaches RECALL_TARGET, and that recall.

    The queries are indexed vectors; each one's own match is dropped from both result
    lists, so they behave as held-out queries.
    """
    ivf = base_ivf(index)
    stored = ids_of(index)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(stored), size=min(queries, len(stored)), replace=False))
    query_ids = stored[pick]
    q = _gather(blocks, query_ids)
    _, truth = exact_knn(q, blocks, k + 1)
    truth = _drop_self(truth, query_ids, k)
    nprobe, recall = 1, 0.0
    while True:
        ivf.nprobe = nprobe
        _, found = index.search(q, k + 1)
        recall = recall_at(_drop_self(found, query_ids, k), truth)
        if recall >= RECALL_TARGET or nprobe >= ivf.nlist:
            return nprobe, recall
        nprobe = min(nprobe * 2, ivf.nlist)


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


def sync(index: faiss.IndexIDMap2, wanted_ids: np.ndarray, vectors_for: Callable) -> int:
    """Patch `index` to hold exactly `wanted_ids`; how many ids changed.

    `vectors_for(ids)` yields (ids, vectors) blocks. Only a flat base renumbers its rows
    on removal, as IDMap2 expects; any other base (IVF, HNSW) is emptied, keeping its
    training, and refilled.
    """
    held = ids_of(index)
    stale = np.setdiff1d(held, wanted_ids, assume_unique=True)
    missing = np.setdiff1d(wanted_ids, held, assume_unique=True)
    if len(stale):
        if isinstance(faiss.downcast_index(index.index), faiss.IndexFlat):
            index.remove_ids(stale)
        else:
            index.reset()
            missing = np.asarray(wanted_ids, dtype=np.int64)
    if len(missing):
        for ids, vectors in vectors_for(missing):
            add_blocks(index, ids, vectors)
    return len(stale) + len(missing)


def write_atomic(index: faiss.Index, path: str | Path) -> None:
    """Write a CPU index: a temp file beside `path`, fsync, rename, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            faiss.write_index(index, str(tmp))
        except RuntimeError as e:  # FAISS's C++ "fwrite ... failed": a full disk, mostly
            reason = str(e).strip().splitlines()[-1][:200]
            raise OSError(errno.EIO, f"cannot write the index ({reason})", str(path)) from None
        replace_durably(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read(path: str | Path, dim: int) -> faiss.IndexIDMap2 | None:
    """Read an index written by `write_atomic`; None if missing, unreadable or not ours."""
    if not Path(path).is_file():
        return None
    try:
        index = faiss.read_index(str(path))
    except RuntimeError:
        return None
    if not isinstance(index, faiss.IndexIDMap2) or index.d != dim:
        return None
    return index


class Searcher:
    """Searches a CPU IDMap2 index, on the GPU when there is one and the index type allows."""

    def __init__(self, index: faiss.IndexIDMap2, nprobe: int | None, device: str = "auto"):
        self.index = index
        self.nprobe = nprobe
        self.id_map = ids_of(index)
        self.gpu = None
        if device in ("auto", "cuda") and faiss.get_num_gpus() > 0:
            self.gpu = _to_gpu(index.index, nprobe)
        if device == "cuda" and self.gpu is None:
            raise UserError("device cuda was asked for, but FAISS has no GPU for this index")

    @property
    def device(self) -> str:
        return "cuda" if self.gpu is not None else "cpu"

    def refresh(self) -> None:
        """Pick up additions and removals made to the CPU index."""
        self.id_map = ids_of(self.index)
        if self.gpu is not None:
            self.gpu = _to_gpu(self.index.index, self.nprobe)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each nq x k; missing neighbours have id -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(int(k), self.index.ntotal)) if self.index.ntotal else int(k)
        if self.index.ntotal == 0:
            return (
                np.full((len(queries), k), -np.inf, dtype=np.float32),
                np.full((len(queries), k), -1, dtype=np.int64),
            )
        if self.gpu is not None and k <= GPU_MAX_K:
            scores, pos = self.gpu.search(queries, k)
            ids = np.where(pos >= 0, self.id_map[np.maximum(pos, 0)], -1)
            return scores, ids
        return self.index.search(queries, k)


def _to_gpu(base: faiss.Index, nprobe: int | None) -> faiss.Index | None:
    """A GPU copy of the base index, or None where FAISS has no GPU version of it."""
    try:
        resources = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(resources, 0, base)
        gpu.referenced_resources = resources  # keep the resources alive with the index
        if nprobe and hasattr(gpu, "nprobe"):
            gpu.nprobe = min(int(nprobe), GPU_MAX_K)
        return gpu
    except (RuntimeError, AttributeError):
        return None
