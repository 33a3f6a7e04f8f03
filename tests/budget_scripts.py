"""The subprocesses of tests/test_index_budget.py, each with a peak RSS of its own.

    python -m tests.budget_scripts make INDEX N DIM CHOICE_JSON [change]
    python -m tests.budget_scripts search INDEX QUERIES_NPY OUT_NPY

`make` writes a store of N clustered vectors the way embed writes it (IndexWriter commits;
with `change`, every 10th item removed and N // 20 new ones added) and builds the index;
`search` opens it read-only in this fresh process and searches it. Each prints one JSON line.
"""

from __future__ import annotations

import json
import resource
import sys

import numpy as np

import mocoserve.index.reader
from mocoserve.core.manifest import ModelFacts
from mocoserve.index.catalog import CatalogMeta
from mocoserve.index.items import NewItem
from mocoserve.index.writer import IndexWriter

CENTRES = 1000  # clusters the vectors are drawn around (`fresh_queries` uses the same)
BLOCK = 100_000  # vectors a commit


def make(index: str, n: int, dim: int, choice: dict, change: bool = False) -> dict:
    """Write (or change) the store of `index` and build it; what the build says."""
    with IndexWriter(index) as w:
        # vectors no package made: a stand-in fingerprint, the same on every run
        w.prepare(ModelFacts("0" * 64, dim), 4, "float32", CatalogMeta.from_meta(choice).choice)
        w.own(range(4))
        if change:  # remove every 10th item, add n // 20 new ones
            w.remove_paths([f"/v/{i:08d}" for i in range(0, n, 10)])
            first, count = n, n // 20
        else:
            first, count = 0, n
        centres = np.random.default_rng(0).normal(size=(CENTRES, dim)).astype(np.float32)
        for start in range(first, first + count, BLOCK):
            k = np.arange(start, min(start + BLOCK, first + count))
            rng = np.random.default_rng(start)
            v = centres[k % CENTRES] + 0.35 * rng.standard_normal((len(k), dim), dtype=np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            items = [
                NewItem(f"/v/{i:08d}", None, "0", 1, 1, 1, 1, x) for i, x in zip(k, v, strict=True)
            ]
            w.commit(items, [])
        info = w.build()
    return {"items": info.items, "factory": info.factory, "summary": info.summary}


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def search(index_path: str, queries: str, out: str) -> dict:
    """Top 10 of each query (ids saved to `out`, -1 padded); peak RSS above the imports."""
    q = np.load(queries)
    base = _rss()  # the imports (faiss-gpu maps its CUDA libraries), measured apart
    idx = mocoserve.index.reader.open(index_path, readonly=True)
    hits = idx.search_vectors(q, 10)
    ids = np.array([[h.id for h in row] + [-1] * (10 - len(row)) for row in hits])
    np.save(out, ids)
    info = {k: v for k, v in idx.info().items() if k != "labels"}
    return {"peak_above_imports": _rss() - base, "info": info}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    command, rest = args[0], args[1:]
    if command == "make":
        index, n, dim, choice = rest[0], int(rest[1]), int(rest[2]), json.loads(rest[3])
        result = make(index, n, dim, choice, change=len(rest) > 4)
    elif command == "search":
        result = search(rest[0], rest[1], rest[2])
    else:
        raise SystemExit(f"unknown command {command!r}: make or search")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
