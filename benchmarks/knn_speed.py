"""`mocoserve knn`'s classifier against scikit-learn's brute-force KNeighborsClassifier.

60,000 train x 10,000 query random 128-d vectors (L2-normalised, 10 classes), the same k
and uniform weights, in one run: both are timed from vectors to predictions, and the
predictions must be identical. Also times the weighted (exp(sim / T)) variant.
Usage: python benchmarks/knn_speed.py [--train 60000] [--queries 10000] [--k 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mocoserve.ann import knn
from mocoserve.ann.factory import normalize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", type=int, default=60_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    train = normalize(rng.normal(size=(args.train, args.dim)))
    labels = rng.integers(0, args.classes, args.train)
    queries = normalize(rng.normal(size=(args.queries, args.dim)))

    start = time.perf_counter()
    clf = KNeighborsClassifier(n_neighbors=args.k, algorithm="brute", n_jobs=-1)
    theirs = clf.fit(train, labels).predict(queries)
    sklearn_s = time.perf_counter() - start

    start = time.perf_counter()
    ours = knn.knn_classify(
        train, labels, queries, args.classes, (args.k,), 1.0, weighting="uniform"
    )
    ours_s = time.perf_counter() - start

    start = time.perf_counter()
    knn.knn_classify(train, labels, queries, args.classes, (args.k,), 0.07)
    weighted_s = time.perf_counter() - start

    same = int(np.sum(ours.top5[args.k][:, 0] == theirs))
    r = {
        "train": args.train,
        "queries": args.queries,
        "dim": args.dim,
        "k": args.k,
        "sklearn_brute_s": sklearn_s,
        "mocoserve_uniform_s": ours_s,
        "mocoserve_weighted_s": weighted_s,
        "speedup": sklearn_s / ours_s,
        "identical_predictions": f"{same}/{args.queries}",
    }
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
