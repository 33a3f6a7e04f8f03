"""Weighted k-NN classification of embeddings, as in the self-supervised literature.

Each of the k nearest training embeddings (cosine similarity) votes for its class with
weight exp(sim / T) (Wu et al. 2018, used by MoCo and DINO); `uniform` weighting counts
votes instead. Neighbours come from FAISS in chunks of queries, so memory is bounded by
chunk x k, not by train x val.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mocoserve.ann.factory import new_index
from mocoserve.ann.search import Searcher

PRESETS: dict[str, dict] = {
    "dino": {"k": 20, "temperature": 0.07, "ks": (10, 20, 100, 200)},
    "moco": {"k": 200, "temperature": 0.1, "ks": (200,)},
}


def neighbours(
    train: np.ndarray,
    queries: np.ndarray,
    k: int,
    self_ids: np.ndarray | None = None,
    chunk: int = 4096,
    device: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, train rows) of each query's k nearest train vectors, best first.

    `self_ids[i]` is query i's own row in `train` (leave-one-out), dropped from its list.
    """
    k = min(k, len(train) - (1 if self_ids is not None else 0))
    index = new_index("Flat", train.shape[1])
    index.add_with_ids(np.ascontiguousarray(train, dtype=np.float32), np.arange(len(train)))
    searcher = Searcher(index, None, device)
    extra = 1 if self_ids is not None else 0
    sims = np.empty((len(queries), k), dtype=np.float32)
    rows = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        q = np.ascontiguousarray(queries[start : start + chunk], dtype=np.float32)
        s, r = searcher.search(q, k + extra)
        if self_ids is not None:
            own = self_ids[start : start + chunk, None]
            keep = r != own
            keep[keep.sum(1) > k, -1] = False  # self not found: drop the last instead
            s = s[keep].reshape(len(q), k)
            r = r[keep].reshape(len(q), k)
        sims[start : start + len(q)], rows[start : start + len(q)] = s, r
    return sims, rows


def class_scores(
    sims: np.ndarray,
    neighbour_labels: np.ndarray,
    num_classes: int,
    temperature: float,
    weighting: str = "exp",
) -> np.ndarray:
    """N x C votes from the neighbours (their columns in `sims`/`neighbour_labels`)."""
    weights = np.exp(sims / temperature) if weighting == "exp" else np.ones_like(sims)
    scores = np.zeros((len(sims), num_classes), dtype=np.float64)
    np.add.at(scores, (np.arange(len(sims))[:, None], neighbour_labels), weights)
    return scores


def top_classes(scores: np.ndarray, n: int = 5) -> np.ndarray:
    """N x n class indices, best first; ties go to the smaller class index."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, : min(n, scores.shape[1])]


@dataclass
class KnnResult:
    """Predictions for each k: `top5[k]` is N x min(5, C) class indices."""

    ks: tuple[int, ...]
    temperature: float
    top5: dict[int, np.ndarray]
    sims: np.ndarray  # N x max(ks)
    rows: np.ndarray  # N x max(ks), rows of the train set

    def accuracy(self, labels: np.ndarray, k: int) -> tuple[float, float]:
        """(top-1, top-5) in percent."""
        pred = self.top5[k]
        top1 = float(np.mean(pred[:, 0] == labels) * 100)
        top5 = float(np.mean((pred == labels[:, None]).any(1)) * 100)
        return top1, top5


def knn_classify(
    train: np.ndarray,
    train_labels: np.ndarray,
    queries: np.ndarray,
    num_classes: int,
    ks: tuple[int, ...],
    temperature: float,
    self_ids: np.ndarray | None = None,
    weighting: str = "exp",
    chunk: int = 4096,
    device: str = "auto",
) -> KnnResult:
    """Classify every query for each k in `ks` with one neighbour search (the largest k)."""
    kmax = max(ks)
    sims, rows = neighbours(train, queries, kmax, self_ids, chunk, device)
    labels = train_labels[rows]
    top5 = {}
    for k in ks:
        kk = min(k, sims.shape[1])
        scores = class_scores(sims[:, :kk], labels[:, :kk], num_classes, temperature, weighting)
        top5[k] = top_classes(scores)
    return KnnResult(tuple(ks), temperature, top5, sims, rows)


def confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """C x C counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix
