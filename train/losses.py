"""Contrastive losses as plain functions of tensors.

Each takes L2-normalised embeddings, finds its device from them and returns a scalar, so
the same function runs in a CPU unit test, in one GPU process and under DDP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mocoserve.train import distributed


def info_nce_logits(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """MoCo's logits: each query against its own key (column 0) and the K queued keys.

    q, k: N x D, queue: K x D, all L2-normalised; returns N x (1+K), divided by T.
    """
    l_pos = torch.einsum("nd,nd->n", q, k).unsqueeze(-1)  # N x 1
    l_neg = torch.einsum("nd,kd->nk", q, queue)  # N x K
    return torch.cat([l_pos, l_neg], dim=1) / temperature  # N x (1+K)


def info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """MoCo's InfoNCE (He et al. 2020, eq. 1): each query against its key and the queue.

    q, k: N x D, queue: K x D, all L2-normalised; k and queue carry no gradient.
    Cross-entropy over N x (1+K) logits with the positive first.
    """
    logits = info_nce_logits(q, k, queue, temperature)
    targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, targets)


@torch.no_grad()
def positive_rank_accuracy(
    logits: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> list[torch.Tensor]:
    """Percent of rows whose positive (column 0) ranks in the top k, for each k (MoCo's Acc@k).

    A free health signal of contrastive training: chance is k / (1+K). Stays on the device.
    """
    positive = logits[:, :1]  # N x 1
    rank = (logits[:, 1:] > positive).sum(dim=1)  # N: negatives scoring above the positive
    return [(rank < k).float().mean() * 100.0 for k in ks]


def _supcon(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    contrast: torch.Tensor,
    contrast_labels: torch.Tensor,
    self_index: torch.Tensor | None,
    temperature: float,
    base_temperature: float,
) -> torch.Tensor:
    """SupCon L_out (Khosla et al. 2020, eq. 2) of each anchor against a contrast set.

    anchors: A x D, contrast: C x D, labels: A and C; self_index: A, the column of each
    anchor's own entry in the contrast set (excluded from numerator and denominator), or None.
    Anchors without any positive are left out of the mean.
    """
    logits = anchors @ contrast.T / temperature  # A x C
    positives = anchor_labels.view(-1, 1) == contrast_labels.view(1, -1)  # A x C
    if self_index is not None:
        not_self = torch.ones_like(positives)
        not_self[torch.arange(anchors.shape[0], device=anchors.device), self_index] = False
        positives &= not_self
        logits = logits.masked_fill(~not_self, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # A x C
    n_pos = positives.sum(dim=1)  # A
    # where() rather than multiply: log_prob is -inf at the excluded self entry
    pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    has_pos = (n_pos > 0).to(log_prob.dtype)
    mean_log_prob_pos = pos_log_prob / n_pos.clamp(min=1)  # A
    # a masked mean rather than boolean indexing: no host-device sync in the training step
    mean_over_anchors = (mean_log_prob_pos * has_pos).sum() / has_pos.sum().clamp(min=1)
    return -(temperature / base_temperature) * mean_over_anchors


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    contrast_mode: str = "all",
    gather_distributed: bool = False,
) -> torch.Tensor:
    """Supervised contrastive loss, the SupCon paper's L_out; SimCLR's loss when labels is None.

    features: B x V x D (V views of B images), L2-normalised; labels: B.
    contrast_mode "all" uses every view as an anchor, "one" only the first view.
    With gather_distributed, the contrast set holds every rank's features (with gradients).
    """
    if features.dim() != 3:
        raise ValueError(f"features must be B x V x D, got shape {tuple(features.shape)}")
    if contrast_mode not in ("all", "one"):
        raise ValueError(f"contrast_mode must be 'all' or 'one', got {contrast_mode!r}")
    b, v, _ = features.shape
    device = features.device
    if labels is None:  # every image is its own class: SimCLR
        labels = torch.arange(b, device=device) + distributed.rank() * b
    labels = labels.view(-1).to(device)
    if labels.shape[0] != b:
        raise ValueError(f"{labels.shape[0]} labels for {b} images")

    local = features.transpose(0, 1).reshape(v * b, -1)  # (V*B) x D, view-major
    local_labels = labels.repeat(v)  # V*B
    n_anchor_views = v if contrast_mode == "all" else 1
    anchors = local[: n_anchor_views * b]
    anchor_labels = local_labels[: n_anchor_views * b]

    if gather_distributed and distributed.world_size() > 1:
        contrast = distributed.all_gather_with_grad(local)  # (W*V*B) x D, rank-major
        contrast_labels = distributed.all_gather(local_labels)
        offset = distributed.rank() * v * b
    else:
        contrast, contrast_labels, offset = local, local_labels, 0
    self_index = torch.arange(n_anchor_views * b, device=device) + offset
    return _supcon(
        anchors, anchor_labels, contrast, contrast_labels, self_index, temperature, base_temperature
    )


def supcon_queue_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    labels: torch.Tensor,
    queue: torch.Tensor,
    queue_labels: torch.Tensor,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
) -> torch.Tensor:
    """SupCon against a MoCo-style memory: queries vs. the batch's keys and a queue of keys.

    q, k: N x D (query and momentum-encoder embeddings of two views), labels: N;
    queue: K x D with queue_labels: K (-1 for slots not yet filled: never a positive).
    A query's positives are its own key and every key or queue entry with its label.
    """
    contrast = torch.cat([k, queue], dim=0)  # (N+K) x D
    contrast_labels = torch.cat([labels.view(-1), queue_labels.view(-1)])  # N+K
    return _supcon(
        q, labels.view(-1), contrast, contrast_labels, None, temperature, base_temperature
    )


def moco_v3_logits(
    q: torch.Tensor, k: torch.Tensor, temperature: float, gather_distributed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo v3's logits: each query against every rank's keys, and the column of its positive.

    q: N x D (predictor outputs), k: N x D (momentum keys of the other view), L2-normalised;
    returns N x G logits divided by T (G = the global batch) and the N positive columns.
    """
    keys = distributed.all_gather(k) if gather_distributed else k  # G x D, no gradient
    logits = torch.einsum("nd,md->nm", q, keys) / temperature  # N x G
    offset = q.shape[0] * distributed.rank() if gather_distributed else 0
    labels = torch.arange(q.shape[0], device=q.device) + offset  # N: this rank's rows of G
    return logits, labels


def moco_v3_loss(
    q: torch.Tensor, k: torch.Tensor, temperature: float, gather_distributed: bool = True
) -> torch.Tensor:
    """ctr(q, k) of MoCo v3 (Chen et al. 2021, Alg. 1): cross-entropy against the positive, x 2T.

    q, k: N x D, L2-normalised; k carries no gradient. With gather_distributed the negatives
    are every rank's keys (the reference's concat_all_gather); no queue.
    """
    logits, labels = moco_v3_logits(q, k, temperature, gather_distributed)
    return F.cross_entropy(logits, labels) * (2 * temperature)


def moco_v3_symmetric_loss(
    q1: torch.Tensor,
    q2: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    temperature: float,
    gather_distributed: bool = True,
) -> torch.Tensor:
    """MoCo v3's symmetrised loss ctr(q1, k2) + ctr(q2, k1); all N x D, L2-normalised."""
    return moco_v3_loss(q1, k2, temperature, gather_distributed) + moco_v3_loss(
        q2, k1, temperature, gather_distributed
    )
