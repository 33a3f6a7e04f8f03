"""Search queries/s of the index types `embed` builds, on N x D clustered random vectors.

Measured in one run: exact (Flat) and auto IVF (nlist ~ 4 sqrt(N), nprobe tuned to
recall@10 >= 0.95) through `mocoserve.vectors.Searcher`, on the CPU and, where FAISS sees
a GPU, on the GPU; with recall@10 of IVF against exact on fresh queries.
Usage: python benchmarks/search_qps.py [--n 1000000] [--dim 128] [--queries 1000] [--k 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mocoserve import vectors as vec


def clustered(n: int, dim: int, seed: int, clusters: int = 1000) -> np.ndarray:
    centres = np.random.default_rng(0).normal(size=(clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    x = centres[rng.integers(0, clusters, n)]
    x += 1.0 * rng.standard_normal(size=x.shape, dtype=np.float32)
    return vec.normalize(x)


def qps(searcher: vec.Searcher, q: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    searcher.search(q[:10], k)  # warm-up
    start = time.perf_counter()
    _, ids = searcher.search(q, k)
    return len(q) / (time.perf_counter() - start), ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    x = clustered(args.n, args.dim, seed=0)
    ids = np.arange(args.n, dtype=np.int64)
    q = clustered(args.queries, args.dim, seed=1)
    rng = np.random.default_rng(0)

    def blocks():
        for i in range(0, args.n, 100_000):
            yield ids[i : i + 100_000], x[i : i + 100_000]

    def sample(m: int) -> np.ndarray:
        return x[np.sort(rng.choice(args.n, size=min(m, args.n), replace=False))]

    r: dict = {"n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k}
    r["gpus"] = faiss.get_num_gpus()
    r["threads"] = faiss.omp_get_max_threads()
    start = time.perf_counter()
    flat = vec.build("Flat", args.dim, blocks, sample, args.n)
    r["flat_build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    ivf = vec.build(vec.choose_factory("ivf", args.n), args.dim, blocks, sample, args.n)
    r["ivf_build_and_tune_s"] = time.perf_counter() - start
    r["ivf_factory"], r["ivf_nprobe"] = ivf.factory, ivf.nprobe
    r["ivf_tuning_recall_at_10"] = ivf.recall_at_10
    devices = ["cpu"] + (["cuda"] if r["gpus"] else [])
    for device in devices:
        r[f"flat_{device}_qps"], exact = qps(vec.Searcher(flat.index, None, device), q, args.k)
        r[f"ivf_{device}_qps"], found = qps(vec.Searcher(ivf.index, ivf.nprobe, device), q, args.k)
        r[f"ivf_{device}_recall_at_10"] = vec.recall_at(found, exact)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
