"""FAISS helpers: build, train, tune, patch, save and search an inner-product index.

Plain functions, numpy in and numpy out; which index to build is `mocoserve.ann.planner`'s
choice. Ids are store ids: IVF indexes keep them in their inverted lists, the others (Flat,
HNSW) in an `IndexIDMap2`, so an index can be patched (ids removed and added) to agree with
the store. IVF lists can live in a file (`OnDiskInvertedLists`), memory-mapped to search.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from mocoserve.core.errors import UserError
from mocoserve.core.files import replace_durably

RECALL_TARGET = 0.95  # IVF/HNSW: search parameters are raised until recall@10 reaches this
GPU_MAX_K = 2048  # FAISS GPU k-selection limit (also nprobe's)
GPU_QUERY_CHUNK = 8192  # queries per GPU search call, below FAISS GPU's temporary-memory limits
K_FACTORS = (1, 2, 4, 8, 16, 32)  # re-rank k * k_factor candidates of compressed codes
METRIC = faiss.METRIC_INNER_PRODUCT

Blocks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
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
        isinstance(base, faiss.IndexHNSW) and isinstance(base.storage, faiss.IndexFlat)
    )


def on_disk(index: faiss.Index) -> bool:
    ivf = base_ivf(index)
    return ivf is not None and isinstance(
        faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists
    )


@dataclass
class SearchSettings:
    """Search-time parameters, as tuned: nprobe (IVF), efSearch (HNSW graph or the HNSW
    coarse quantizer), k_factor (re-rank k * k_factor candidates with the stored vectors)."""

    nprobe: int | None = None
    ef_search: int | None = None
    k_factor: int = 1

    def to_meta(self) -> dict[str, str]:
        return {
            "nprobe": str(self.nprobe or ""),
            "ef_search": str(self.ef_search or ""),
            "k_factor": str(self.k_factor),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> SearchSettings:
        def num(key: str) -> int | None:
            value = meta.get(key)
            return int(value) if value else None

        return cls(num("nprobe"), num("ef_search"), num("k_factor") or 1)

    def describe(self) -> str:
        parts = []
        if self.nprobe:
            parts.append(f"nprobe {self.nprobe}")
        if self.ef_search:
            parts.append(f"efSearch {self.ef_search}")
        if self.k_factor > 1:
            parts.append(f"re-rank x{self.k_factor}")
        return ", ".join(parts)


def _names(index: faiss.Index) -> dict[str, int]:
    """Which ParameterSpace names the settings map to, for this index."""
    names = {}
    ivf = base_ivf(index)
    if ivf is not None:
        names["nprobe"] = 1
        if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
            names["quantizer_efSearch"] = 1
    elif isinstance(inner(index), faiss.IndexHNSW):
        names["efSearch"] = 1
    return names


def apply_settings(
    index: faiss.Index, settings: SearchSettings, space=None, like: faiss.Index | None = None
) -> None:
    """Set nprobe / efSearch through `faiss.ParameterSpace` (GpuParameterSpace on a GPU).

    `like`: the CPU index a GPU copy was made from (which names apply is read from it;
    GpuParameterSpace walks replicas and shards itself).
    """
    space = space or faiss.ParameterSpace()
    names = _names(like if like is not None else index)
    if "nprobe" in names and settings.nprobe:
        space.set_index_parameter(index, "nprobe", int(settings.nprobe))
    if settings.ef_search:
        for name in ("quantizer_efSearch", "efSearch"):
            if name in names:
                space.set_index_parameter(index, name, int(settings.ef_search))


def search_params(
    index: faiss.Index, settings: SearchSettings, selector: faiss.IDSelector | None
) -> faiss.SearchParameters | None:
    """Per-call parameters carrying a selector and the same nprobe / efSearch."""
    if selector is None:
        return None
    ivf = base_ivf(index)
    if ivf is not None:
        params = faiss.SearchParametersIVF(sel=selector, nprobe=settings.nprobe or ivf.nprobe)
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            params.quantizer_params = faiss.SearchParametersHNSW(
                efSearch=settings.ef_search or quantizer.hnsw.efSearch
            )
        return params
    base = inner(index)
    if isinstance(base, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(
            sel=selector, efSearch=settings.ef_search or base.hnsw.efSearch
        )
    return faiss.SearchParameters(sel=selector)


def ids_of(index: faiss.Index) -> np.ndarray:
    """The ids an index holds (an IDMap2's map, or an IVF's inverted lists)."""
    if isinstance(index, faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
    ivf = base_ivf(index)
    if ivf is None:
        raise TypeError(f"no ids in a {type(index).__name__}")
    lists = ivf.invlists
    parts = []
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


@dataclass
class Built:
    """An index and what tuning found."""

    index: faiss.Index
    factory: str
    settings: SearchSettings
    recall_at_10: float | None = None
    qps: float | None = None

    @property
    def nprobe(self) -> int | None:
        return self.settings.nprobe


def train_size(index: faiss.Index, n: int) -> int:
    """Training vectors to draw: 64 a list for k-means (FAISS wants 39+), and at least
    65,536 for the PQ and OPQ codebooks, never more than there are."""
    ivf = base_ivf(index)
    needed = ivf.nlist * 64 if ivf is not None else 10_000
    return min(n, max(needed, 65_536 if not exact_codes(index) else 10_000))


def build(
    factory: str,
    dim: int,
    blocks: Blocks,
    train_sample: Callable[[int], np.ndarray],
    n: int,
    target: float = RECALL_TARGET,
    gather: Gather | None = None,
    lists_path: str | Path | None = None,
    tune_queries: int = 1000,
    seed: int = 0,
) -> Built:
    """Build an index from (ids, vectors) blocks; train it on a sample; tune its search.

    `blocks()` can be called more than once (tuning reads the vectors again for the exact
    neighbours); `train_sample(m)` returns m vectors drawn from the whole set; `gather(ids)`
    reads stored vectors by id (for re-ranking compressed codes). With `lists_path` the
    inverted lists are written there (`OnDiskInvertedLists`), block by block.
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
        try:
            train(index, train_sample(train_size(index, n)))
        except RuntimeError as e:  # FAISS's C++ checks: too few points for its codebooks
            reason = str(e).strip().splitlines()[-1].split("failed: ")[-1][:200]
            raise UserError(
                f"index {factory!r} cannot be trained on {n} vectors ({reason}); "
                "use --index-type auto or flat until there are more"
            ) from None
    if lists_path is not None:
        index = fill_on_disk(index, blocks(), lists_path)
    else:
        for ids, vectors in blocks():
            add_blocks(index, ids, vectors)
    settings, recall, qps = tune(index, blocks, n, target, gather, tune_queries, seed)
    apply_settings(index, settings)
    return Built(index, factory, settings, recall, qps)


def _kmeans(x: np.ndarray, k: int, gpu: bool, seed: int) -> np.ndarray:
    """Spherical k-means centroids (IndexIVF's own choice for inner product).

    Above 4,096 centroids it clusters in two levels (sqrt(k) coarse clusters, each split
    in proportion to its size: `faiss.contrib.clustering.two_level_clustering`), which
    costs about sqrt(k) times less than one flat k-means and loses little.
    """
    from faiss.contrib.clustering import two_level_clustering

    params = {"spherical": True, "seed": seed, "gpu": gpu}
    if k > 4096:
        centroids, _ = two_level_clustering(x, int(math.sqrt(k)), k, **params)
        return np.ascontiguousarray(centroids, dtype=np.float32)
    kmeans = faiss.Kmeans(x.shape[1], k, niter=20, max_points_per_centroid=256, **params)
    kmeans.train(x)
    return kmeans.centroids


def train(index: faiss.Index, sample: np.ndarray, gpu: bool | None = None) -> None:
    """Train an index on a sample: OPQ rotation, coarse k-means (GPU if FAISS has one), codes.

    The stages an `index.train` call would run, each with settings that keep it quick at
    millions of vectors: OPQ on at most 32,768 points and 20 iterations; the coarse
    quantizer by spherical k-means, two-level above 4,096 lists; the PQ/SQ codebooks by
    the IVF's own `train` on the rotated sample (it skips a quantizer already full).
    """
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    ivf = base_ivf(index)
    if ivf is None:
        index.train(sample)
        return
    gpu = faiss.get_num_gpus() > 0 if gpu is None else gpu
    x = sample
    if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
        chain = faiss.downcast_index(index).chain
        for i in range(chain.size()):
            transform = faiss.downcast_VectorTransform(chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                transform.niter, transform.max_train_points = 20, 32_768
            if not transform.is_trained:
                transform.train(x)
            x = transform.apply(x)
    ivf = faiss.downcast_index(ivf)
    if ivf.quantizer.ntotal == 0:
        try:
            centroids = _kmeans(x, ivf.nlist, gpu, ivf.cp.seed)
        except (RuntimeError, AttributeError):
            if not gpu:
                raise
            centroids = _kmeans(x, ivf.nlist, False, ivf.cp.seed)
        ivf.quantizer.add(centroids)
    pq = getattr(ivf, "pq", None)
    if pq is not None:
        pq.cp.max_points_per_centroid = 64  # 16k points for 256 centroids: ~4x quicker
    ivf.train(x)  # the residual codes; the full quantizer is kept
    index.is_trained = True


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

    After the FAISS wiki's "indexes that do not fit in RAM": entries go into empty
    in-memory copies of the index, written as piece files of up to PIECE_ROWS vectors
    beside `lists_path`; the pieces (memory-mapped) are merged into the lists file in one
    pass and deleted. Memory stays one piece's worth. (On-disk lists are never edited in
    place: FAISS's removal from them is not safe, and readers map the old file.)
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
    source, code_size = base_ivf(base).invlists, base_ivf(base).code_size
    piece, rows = empty_like(index), 0
    for i in range(base_ivf(base).nlist):
        size = source.list_size(i)
        if not size:
            continue
        ids_ptr, codes_ptr = source.get_ids(i), source.get_codes(i)
        ids = faiss.rev_swig_ptr(ids_ptr, size).copy()
        codes = faiss.rev_swig_ptr(codes_ptr, size * code_size).copy().reshape(size, code_size)
        source.release_ids(i, ids_ptr)
        source.release_codes(i, codes_ptr)
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
            ids, codes = source.get_ids(i), source.get_codes(i)
            target.add_entries(i, size, ids, codes)
            source.release_ids(i, ids)
            source.release_codes(i, codes)
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


@contextmanager
def quiet_stdout():
    """Silence FAISS's unconditional C printf's (on-disk list resizes and renames).

    They go to file descriptor 1, not Python's sys.stdout; it is pointed at /dev/null for
    the duration, with C's buffers flushed on the way in and out so nothing leaks after.
    """
    import ctypes
    import sys

    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


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
    import time

    names = _names(index)
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


def write_atomic(index: faiss.Index, path: str | Path) -> None:
    """Write a CPU index: a temp file beside `path`, fsync, rename, fsync the folder.

    An index with on-disk lists writes only its header and the lists' file name (the
    lists file is written before, under its own name).
    """
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


def lists_file(index: faiss.Index) -> str | None:
    """The file an index's on-disk inverted lists live in, or None."""
    if not on_disk(index):
        return None
    return faiss.downcast_InvertedLists(base_ivf(index).invlists).filename


def read(path: str | Path, dim: int) -> faiss.Index | None:
    """Read an index written by `write_atomic`; None if missing, unreadable or not ours.

    On-disk inverted lists are memory-mapped read-only from the file beside `path` (the
    index is then never changed in place: a writer makes new lists and swaps the file).
    """
    path = Path(path)
    for _ in range(2):  # the lists file can be swapped between reading the header and it
        if not path.is_file():
            return None
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
        try:
            with quiet_stdout():
                index = faiss.read_index(str(path), flags)
        except RuntimeError:
            continue
        # read_index returns the downcast type; downcasting again would drop the owner
        if index.d != dim or index.metric_type != METRIC:
            return None
        if isinstance(index, faiss.IndexIDMap2) or base_ivf(index) is not None:
            return index
        return None
    return None


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
