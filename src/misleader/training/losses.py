"""Divergences shared by every trainer (one KL helper for the whole project).

Example:
    >>> import torch
    >>> p = torch.tensor([[0.0, 0.0]])
    >>> float(kl_rows(p, p))
    0.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor, *, p: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row ``KL(p || q) = sum_k p_k (log p_k - log q_k)`` from log-probabilities.

    Shape: log_p (N, K), log_q (N, K), optional p (N, K) (``exp(log_p)`` when not given) -> (N,).
    """
    return ((log_p.exp() if p is None else p) * (log_p - log_q)).sum(1)


def kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(softmax(p) || softmax(q))`` from logits, computed exactly in float32.

    Shape: p_logits (N, K), q_logits (N, K) -> (N,). Gradients flow into both arguments; detach
    the one that is a fixed target.
    """
    return kl_from_log_probs(F.log_softmax(p_logits.float(), dim=1), F.log_softmax(q_logits.float(), dim=1))


__all__ = ["kl_from_log_probs", "kl_rows"]
