"""Search queries/s, memory and recall of the indexes `--index-type auto` chooses, by budget.

For each N (default 1M and 5M clustered random 128-d vectors), in one run: exact Flat as
the reference, then what the planner picks with no budget (IVF-Flat), with a budget of a
third of Flat's bytes (IVF-SQ8), a quarter (OPQ + IVF-PQ, re-ranked from the stored
vectors), and --on-disk (IVF-Flat lists in a memory-mapped file). Each is built, trained
and tuned by `mocoserve.ann.build.build` to recall@10 >= 0.95 on held-out queries, then
measured on 1,000 fresh queries through `mocoserve.ann.search.Searcher`: bytes, build time,
recall@10 against exact, queries/s and both as ratios to Flat. Where FAISS sees GPUs, the
same searches run on all of them too.

Usage: python benchmarks/search_qps.py [--n 1000000 5000000] [--dim 128] [--queries 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mocoserve.ann import planner
from mocoserve.ann.build import build
from mocoserve.ann.io import lists_file
from mocoserve.ann.search import Searcher
from mocoserve.ann.tune import recall_at


def clustered(n: int, dim: int, seed: int, clusters: int = 1000) -> np.ndarray:
    centres = np.random.default_rng(0).normal(size=(clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    x = np.empty((n, dim), dtype=np.float32)
    for i in range(0, n, 1_000_000):  # in pieces: no float64 copy of 5M x d
        m = min(1_000_000, n - i)
        x[i : i + m] = centres[rng.integers(0, clusters, m)]
        x[i : i + m] += 1.0 * rng.standard_normal(size=(m, dim), dtype=np.float32)
    faiss.normalize_L2(x)
    return x


def qps(searcher: Searcher, q: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    searcher.search(q[:10], k)  # warm-up
    start = time.perf_counter()
    _, ids = searcher.search(q, k)
    return len(q) / (time.perf_counter() - start), ids


def bytes_of(index: faiss.Index) -> tuple[int, int]:
    """(bytes in RAM, bytes of lists on disk) of an index."""
    lists = lists_file(index)
    if lists:
        with tempfile.NamedTemporaryFile() as f:  # the header and centroids only
            faiss.write_index(index, f.name)
            return Path(f.name).stat().st_size, Path(lists).stat().st_size
    return faiss.serialize_index(index).size, 0


def run(n: int, dim: int, queries: int, k: int, folder: Path) -> list[dict]:
    x = clustered(n, dim, seed=0)
    ids = np.arange(n, dtype=np.int64)
    q = clustered(queries, dim, seed=1)
    rng = np.random.default_rng(0)

    def blocks():
        for i in range(0, n, 100_000):
            yield ids[i : i + 100_000], x[i : i + 100_000]

    def sample(m: int) -> np.ndarray:
        return x[np.sort(rng.choice(n, size=min(m, n), replace=False))]

    def gather(wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = (wanted >= 0) & (wanted < n)
        out = np.zeros((len(wanted), dim), dtype=np.float32)
        out[found] = x[wanted[found]]
        return out, found

    flat_bytes = n * dim * 4
    choices = [
        ("Flat (exact)", planner.choose("flat", n, dim)),
        ("auto, no budget", planner.plan_index(n, dim, flat_limit=0)),
        ("auto, budget Flat/3", planner.plan_index(n, dim, flat_bytes // 3)),
        ("auto, budget Flat/4", planner.plan_index(n, dim, flat_bytes // 4)),
        ("auto, --on-disk", planner.plan_index(n, dim, flat_bytes // 4, on_disk=True)),
    ]
    rows, exact, flat_qps = [], None, {}
    devices = ["cpu"] + (["cuda"] if faiss.get_num_gpus() else [])
    for name, plan in choices:
        disk = folder / f"{n}.lists" if "on-disk" in name else None
        start = time.perf_counter()
        built = build(plan.factory, dim, blocks, sample, n, 0.95, gather, disk)
        row = {
            "n": n,
            "choice": name,
            "factory": plan.factory,
            "build_s": round(time.perf_counter() - start, 1),
            "settings": built.settings.describe() or "-",
            "tuned_recall": built.recall_at_10,
        }
        row["ram_bytes"], row["disk_bytes"] = bytes_of(built.index)
        row["ram_vs_flat"] = round(row["ram_bytes"] / flat_bytes, 3)
        for device in devices:
            searcher = Searcher(built.index, built.settings, device, gather)
            speed, found = qps(searcher, q, k)
            if exact is None:
                exact = found  # Flat first: the reference
            if name.startswith("Flat"):
                flat_qps[device] = speed
            row[f"{device}_qps"] = round(speed)
            row[f"{device}_x_flat"] = round(speed / flat_qps[device], 1)
            row[f"{device}_recall_at_10"] = round(recall_at(found, exact), 4)
            if device == "cuda":
                row["gpus"], row["gpu_layout"] = searcher.gpus, searcher.layout
        rows.append(row)
        print(json.dumps(row), flush=True)
        del built
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    print(f"# {faiss.omp_get_max_threads()} CPU threads, {faiss.get_num_gpus()} GPU(s)")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n in args.n:
            rows += run(n, args.dim, args.queries, args.k, Path(folder))
    columns = ("N", "choice", "factory", "settings", "RAM", "x Flat", "build s", "recall@10")
    columns += ("QPS", "x Flat")
    print("\n| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for r in rows:
        ram = planner.show_size(r["ram_bytes"]) + (
            f" + {planner.show_size(r['disk_bytes'])} disk" if r["disk_bytes"] else ""
        )
        print(
            f"| {r['n']:,} | {r['choice']} | {r['factory']} | {r['settings']} | {ram} | "
            f"{r['ram_vs_flat']} | {r['build_s']} | {r['cpu_recall_at_10']} | "
            f"{r['cpu_qps']:,} | {r['cpu_x_flat']} |"
        )


if __name__ == "__main__":
    main()
