"""Do concurrent shard writers wait on each other? The store layer alone, no images, one run.

P processes each commit B batches of R vectors (D-d float32, with their metadata), as embed
does: the vectors fsynced, then one SQLite transaction. Two layouts:
  shards     format 2: each process writes its own shard (its own SQLite file and vector file)
  one_db     what a single shared sidecar would be: every process commits to one SQLite file
             (WAL, vectors inside, as format 1 stored them)
Rows/s for P = 1, 2, 4. On this 2-core machine more processes cannot add CPU; what the
figures show is whether writers queue behind one lock.
Usage: python benchmarks/store_writers.py [--batches 40] [--rows 256] [--dim 512]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mocoserve.index.formats import Sidecar
from mocoserve.index.items import NewItem
from mocoserve.index.store import Shard


def items(worker: int, batch: int, rows: int, dim: int) -> list[NewItem]:
    v = np.random.default_rng(worker * 10_000 + batch).normal(size=(rows, dim)).astype(np.float32)
    return [
        NewItem(f"/w{worker}/b{batch}/{i}.jpg", None, "0" * 64, 1, 1, 1, 1, v[i])
        for i in range(rows)
    ]


def write_shard(args: tuple) -> None:
    root, worker, workers, batches, rows, dim = args
    shard = Shard(Path(root) / f"{worker:04d}-of-{workers:04d}", worker, workers, dim, writer=True)
    for b in range(batches):
        shard.commit_batch(items(worker, b, rows, dim), [])
    shard.close()


def write_one_db(args: tuple) -> None:
    root, worker, _, batches, rows, dim = args
    sidecar = Sidecar(Path(root) / "one.db")
    for b in range(batches):
        sidecar.commit_batch(items(worker, b, rows, dim), [])
    sidecar.close()


def run(layout, workers: int, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as root:
        if layout is write_one_db:
            Sidecar(Path(root) / "one.db").set_meta({"dim": str(args.dim)})
        jobs = [(root, w, workers, args.batches, args.rows, args.dim) for w in range(workers)]
        start = time.perf_counter()
        with get_context("spawn").Pool(workers) as pool:
            pool.map(layout, jobs)
        return workers * args.batches * args.rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    out = {"batches": args.batches, "rows_per_batch": args.rows, "dim": args.dim}
    for workers in (1, 2, 4):
        out[f"shards_{workers}_rows_s"] = run(write_shard, workers, args)
        out[f"one_db_{workers}_rows_s"] = run(write_one_db, workers, args)
    print(json.dumps({k: round(v) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
