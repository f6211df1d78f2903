"""MISLEADER losses: distillation, the attacker term and the inner clone's loss.

Paper: MISLEADER, arXiv 2506.02362, https://arxiv.org/abs/2506.02362 (see :mod:`misleader.defenses.misleader`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from misleader.training.losses import kl_rows

def kd_loss(d_logits: torch.Tensor, t_logits: torch.Tensor, y: torch.Tensor, *, temperature: float,
            alpha: float) -> torch.Tensor:
    """``alpha T^2 KL(softmax(t/T) || softmax(d/T)) + (1 - alpha) CE(d, y)``, batch mean.

    Shape: d_logits, t_logits (N, K); y (N,) -> scalar. Computed in float32.
    """
    d, t = d_logits.float(), t_logits.float().detach()
    kl = kl_rows(t / temperature, d / temperature).mean()
    loss = alpha * temperature**2 * kl
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(d, y)
    return loss


def attacker_term(d_aug_logits: torch.Tensor, s_aug_logits: torch.Tensor) -> torch.Tensor:
    """``KL(d(x_aug) || s(x_aug))`` batch mean, differentiable in ``d`` only (``s`` is detached)."""
    return kl_rows(d_aug_logits, s_aug_logits.detach()).mean()


def clone_loss(s_aug_logits: torch.Tensor, d_aug_logits: torch.Tensor) -> torch.Tensor:
    """The inner clone's loss ``KL(d(x_aug) || s(x_aug))``, differentiable in ``s`` only."""
    return kl_rows(d_aug_logits.detach(), s_aug_logits).mean()


__all__ = ["attacker_term", "clone_loss", "kd_loss", "kl_rows"]
