"""Metrics on predictions: accuracy, fidelity (top-1 agreement), mean L1 between distributions, accuracy up to a
relabelling of the classes."""

from __future__ import annotations

import torch


def _labels(t: torch.Tensor) -> torch.Tensor:
    return t.argmax(dim=1) if t.dim() == 2 else t


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy. ``pred``: (N, K) scores/probabilities or (N,) labels; ``y``: (N,)."""
    if len(pred) != len(y):
        raise ValueError(f"length mismatch: {len(pred)} predictions vs {len(y)} labels")
    return float((_labels(pred).cpu() == y.cpu()).float().mean())


def fidelity(pred_a: torch.Tensor, pred_b: torch.Tensor) -> float:
    """Top-1 agreement between two models' outputs on the same inputs, in [0, 1]."""
    return accuracy(pred_a, _labels(pred_b))


def mean_l1(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over rows of ||p - q||_1 for (N, K) probability rows; lies in [0, 2]."""
    if p.shape != q.shape:
        raise ValueError(f"shape mismatch: {tuple(p.shape)} vs {tuple(q.shape)}")
    return float((p.float().cpu() - q.float().cpu()).abs().sum(dim=1).mean())


def kl_divergence(p: torch.Tensor, q: torch.Tensor, *, eps: float = 1e-8) -> float:
    """Mean over rows of KL(p || q) for (N, K) probability rows."""
    p, q = p.float().cpu().clamp_min(eps), q.float().cpu().clamp_min(eps)
    return float((p * (p.log() - q.log())).sum(dim=1).mean())


def best_permutation(score: torch.Tensor) -> list[int]:
    """The assignment ``sigma`` maximising ``sum_a score[a, sigma[a]]`` (Hungarian method, O(K^3)).

    Args:
        score: (K, K) weights, e.g. ``score[a, b]`` = how often clone class ``a`` meets oracle class ``b``.

    Returns:
        ``sigma`` as a list: a permutation of ``range(K)``.

    Example:
        >>> best_permutation(torch.tensor([[0., 5.], [4., 1.]]))
        [1, 0]
    """
    if not bool(torch.isfinite(score).all()):
        raise ValueError("best_permutation needs finite scores (a NaN or inf would never let the search end)")
    cost = (-score.double()).tolist()
    k = len(cost)
    inf = float("inf")
    u, v = [0.0] * (k + 1), [0.0] * (k + 1)
    match, way = [0] * (k + 1), [0] * (k + 1)  # match[col] = row (1-based; 0 = free)
    for row in range(1, k + 1):
        match[0], col0 = row, 0
        minv, used = [inf] * (k + 1), [False] * (k + 1)
        while True:
            used[col0] = True
            r, delta, col1 = match[col0], inf, 0
            for j in range(1, k + 1):
                if not used[j]:
                    cur = cost[r - 1][j - 1] - u[r] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, col0
                    if minv[j] < delta:
                        delta, col1 = minv[j], j
            for j in range(k + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            col0 = col1
            if match[col0] == 0:
                break
        while col0:
            col1 = way[col0]
            match[col0] = match[col1]
            col0 = col1
    sigma = [0] * k
    for col in range(1, k + 1):
        sigma[match[col] - 1] = col - 1
    return sigma


def relabelled_accuracy(pred: torch.Tensor, y: torch.Tensor, *, num_classes: int) -> float:
    """Top-1 accuracy of ``pred`` after the relabelling of its classes that maximises it (:func:`best_permutation`
    of the confusion matrix): what an attacker who can undo a secret class permutation gets, at best.

    ``pred``: (N, K) scores or (N,) labels; ``y``: (N,) labels in ``range(num_classes)``.

    Example:
        >>> relabelled_accuracy(torch.tensor([1, 1, 0, 2]), torch.tensor([0, 0, 1, 2]), num_classes=3)
        1.0
    """
    p, t = _labels(pred).cpu().long(), y.cpu().long()
    if len(p) != len(t):
        raise ValueError(f"length mismatch: {len(p)} predictions vs {len(t)} labels")
    conf = torch.zeros(num_classes, num_classes, dtype=torch.float64).index_put_(
        (p, t), torch.ones(len(p), dtype=torch.float64), accumulate=True)
    sigma = torch.tensor(best_permutation(conf))
    return float((sigma[p] == t).float().mean())
