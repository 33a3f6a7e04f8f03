"""Training an index on a sample: OPQ rotation, coarse k-means (GPU if FAISS has one), codes."""

from __future__ import annotations

import math

import faiss
import numpy as np

from mocoserve.ann.factory import base_ivf, exact_codes


def train_size(index: faiss.Index, n: int) -> int:
    """Training vectors to draw: 64 a list for k-means (FAISS wants 39+), and at least
    65,536 for the PQ and OPQ codebooks, never more than there are."""
    ivf = base_ivf(index)
    needed = ivf.nlist * 64 if ivf is not None else 10_000
    return min(n, max(needed, 65_536 if not exact_codes(index) else 10_000))


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
