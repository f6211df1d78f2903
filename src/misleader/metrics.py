"""Metrics on predictions: accuracy, fidelity (top-1 agreement), mean L1 between distributions."""

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
