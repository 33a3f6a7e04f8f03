"""Weighted k-NN classification on embeddings (Wu et al. 2018), the monitor used during training."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    exclude_self: bool = False,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores: each of the top-k neighbours votes exp(sim / T) for its class.

    train_features: M x D, query_features: Q x D, both L2-normalised; returns Q x classes.
    With exclude_self the queries are the training set itself (leave-one-out).
    """
    k = min(k, train_features.shape[0] - (1 if exclude_self else 0))
    scores = []
    for start in range(0, query_features.shape[0], chunk_size):
        q = query_features[start : start + chunk_size]
        sim = q @ train_features.T  # chunk x M
        if exclude_self:
            rows = torch.arange(q.shape[0], device=q.device)
            sim[rows, rows + start] = float("-inf")
        top_sim, top_idx = sim.topk(k, dim=1)  # chunk x k
        weights = (top_sim / temperature).exp()
        votes = F.one_hot(train_labels[top_idx], num_classes).to(weights.dtype)  # chunk x k x C
        scores.append((votes * weights.unsqueeze(-1)).sum(dim=1))
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict:
    """Top-k accuracies in percent, for each k in ks (capped at the number of classes)."""
    out = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        hit = (scores.topk(kk, dim=1).indices == labels.view(-1, 1)).any(dim=1)
        out[f"top{k}"] = 100.0 * hit.float().mean().item()
    return out
