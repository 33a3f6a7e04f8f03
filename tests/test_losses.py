"""Losses against independent, loop-by-loop references of the papers' equations (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mocoserve.train.losses import (
    info_nce,
    info_nce_logits,
    positive_rank_accuracy,
    supcon_loss,
    supcon_queue_loss,
)


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def ref_info_nce(q, k, queue, t):
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / t)
        neg = sum(math.exp(float(q[i] @ queue[j]) / t) for j in range(queue.shape[0]))
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


def ref_supcon(anchors, anchor_labels, contrast, contrast_labels, self_cols, t, base_t):
    """Khosla et al. eq. 2: -(t/base_t) mean over anchors of 1/|P(i)| sum_p log softmax."""
    losses = []
    for i in range(anchors.shape[0]):
        candidates = [a for a in range(contrast.shape[0]) if self_cols is None or a != self_cols[i]]
        positives = [a for a in candidates if contrast_labels[a] == anchor_labels[i]]
        if not positives:
            continue
        denom = sum(torch.exp(anchors[i] @ contrast[a] / t) for a in candidates)
        s = sum(torch.log(torch.exp(anchors[i] @ contrast[p] / t) / denom) for p in positives)
        losses.append(-(t / base_t) * s / len(positives))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("n,kq,d", [(1, 1, 2), (4, 7, 8), (9, 33, 16)])
@pytest.mark.parametrize("t", [0.07, 0.2, 1.0])
def test_info_nce_matches_reference(n, kq, d, t):
    q, k, queue = unit(n, d, seed=1), unit(n, d, seed=2), unit(kq, d, seed=3)
    assert info_nce(q, k, queue, t).item() == pytest.approx(ref_info_nce(q, k, queue, t), rel=1e-9)


def test_info_nce_positive_first_and_gradient_direction():
    n, t = 3, 0.1
    q = unit(n, 8, seed=4).requires_grad_(True)
    k, queue = unit(n, 8, seed=6), unit(5, 8, seed=5)
    logits = info_nce_logits(q.detach(), k, queue, t)
    # the positive is logit 0: q.k / T; then the K negatives q.queue_j / T
    torch.testing.assert_close(logits[:, 0], (q.detach() * k).sum(1) / t)
    torch.testing.assert_close(logits[:, 1:], q.detach() @ queue.T / t)
    loss = info_nce(q, k, queue, t)
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(n, dtype=torch.long)))
    loss.backward()
    # dL/dq_i = (sum_j p_ij c_j - k_i) / (N T): towards the key, away from the negatives
    p = logits.softmax(dim=1)  # N x (1+K)
    candidates = torch.cat([k.unsqueeze(1), queue.expand(n, -1, -1)], dim=1)  # N x (1+K) x D
    expected = ((p.unsqueeze(-1) * candidates).sum(1) - k) / (n * t)
    torch.testing.assert_close(q.grad, expected)
    assert ((q.grad * k).sum(1) < 0).all()  # a descent step raises each q.k
    stepped = q.detach() - 0.5 * q.grad
    assert info_nce(stepped, k, queue, t) < loss


def test_positive_rank_accuracy_counts_where_the_positive_ranks():
    logits = torch.tensor(
        [
            [5.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0],  # positive first: in top 1 and top 5
            [2.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # second: top 5 only
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # last of seven: neither
        ]
    )
    top1, top5 = positive_rank_accuracy(logits, (1, 5))
    assert top1.item() == pytest.approx(100 / 3) and top5.item() == pytest.approx(200 / 3)


def _supcon_reference(features, labels, t, base_t, mode):
    b, v, _ = features.shape
    contrast = features.transpose(0, 1).reshape(v * b, -1)
    lab = (labels if labels is not None else torch.arange(b)).repeat(v)
    n_anchor = v * b if mode == "all" else b
    return ref_supcon(
        contrast[:n_anchor], lab[:n_anchor], contrast, lab, list(range(n_anchor)), t, base_t
    )


@pytest.mark.parametrize("b,v,d", [(2, 2, 4), (6, 2, 8), (5, 3, 16)])
@pytest.mark.parametrize("t,base_t", [(0.07, 0.07), (0.1, 0.07), (0.5, 1.0)])
@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_supcon_matches_reference_loss_and_gradient(b, v, d, t, base_t, mode, with_labels):
    feats = unit(b, v, d, seed=b * 10 + v)
    labels = torch.tensor([i % 3 for i in range(b)]) if with_labels else None
    x = feats.clone().requires_grad_(True)
    ours = supcon_loss(x, labels, t, base_t, mode)
    ours.backward()
    y = feats.clone().requires_grad_(True)
    ref = _supcon_reference(y, labels, t, base_t, mode)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-7, atol=1e-10)


def test_supcon_matches_original_supcontrast_formula():
    """The SupContrast repository's mask arithmetic, for one labelled case with V=2."""
    feats, labels, t = unit(8, 2, 16, seed=11), torch.tensor([0, 1, 0, 2, 1, 0, 2, 2]), 0.1
    contrast = torch.cat(torch.unbind(feats, dim=1), dim=0)
    mask = torch.eq(labels.view(-1, 1), labels.view(1, -1)).double().repeat(2, 2)
    logits = contrast @ contrast.T / t
    logits = logits - logits.max(dim=1, keepdim=True).values
    logits_mask = torch.ones_like(mask).scatter(1, torch.arange(16).view(-1, 1), 0)
    mask = mask * logits_mask
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    expected = -((mask * log_prob).sum(1) / mask.sum(1)).mean()
    assert supcon_loss(feats, labels, t, t).item() == pytest.approx(expected.item(), rel=1e-9)


def test_supcon_single_view_unique_labels_has_no_positive_and_is_zero():
    feats = unit(4, 1, 8, seed=3).requires_grad_(True)
    loss = supcon_loss(feats, torch.arange(4))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(feats.grad).all()


def test_supcon_rejects_bad_shapes():
    with pytest.raises(ValueError, match="B x V x D"):
        supcon_loss(unit(4, 8, seed=1))
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(unit(4, 2, 8, seed=1), torch.arange(3))


@pytest.mark.parametrize("n,kq", [(3, 5), (8, 16)])
@pytest.mark.parametrize("t", [0.07, 0.3])
def test_supcon_queue_matches_reference(n, kq, t):
    q, k, queue = unit(n, 8, seed=1), unit(n, 8, seed=2), unit(kq, 8, seed=3)
    labels = torch.tensor([i % 2 for i in range(n)])
    queue_labels = torch.tensor([(i % 3) - 1 for i in range(kq)])  # includes -1 (empty slots)
    x = q.clone().requires_grad_(True)
    ours = supcon_queue_loss(x, k, labels, queue, queue_labels, t, 0.07)
    ref = ref_supcon(
        q, labels, torch.cat([k, queue]), torch.cat([labels, queue_labels]), None, t, 0.07
    )
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)
    ours.backward()
    assert torch.isfinite(x.grad).all()


def test_supcon_queue_with_unique_labels_and_empty_queue_is_info_nce():
    """Unique labels, unlabelled queue, T = base T: InfoNCE whose negatives are the queue and
    the other images' keys."""
    q, k, queue = unit(6, 8, seed=7), unit(6, 8, seed=8), unit(10, 8, seed=9)
    ours = supcon_queue_loss(q, k, torch.arange(6), queue, torch.full((10,), -1), 0.2, 0.2)
    expected = (
        sum(
            ref_info_nce(q[i : i + 1], k[i : i + 1], torch.cat([k[:i], k[i + 1 :], queue]), 0.2)
            for i in range(6)
        )
        / 6
    )
    assert ours.item() == pytest.approx(expected, rel=1e-9)
