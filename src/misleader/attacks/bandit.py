"""Adaptive query selection helpers: rewards, online z-normalisation and the gradient bandit.

Used by adaptive Knockoff Nets (:mod:`misleader.attacks.knockoff`; Orekondy et al., CVPR 2019,
https://arxiv.org/abs/1812.02766, section 4.1.2) and available to any attack that picks among arms.
The rewards follow ART's ``KnockoffNets`` (``art/attacks/extraction/knockoff_nets.py``) with the
numerical guards its issue #1746 asks for.

Deviations from the reference code:
    * Rewards use the victim's probabilities as they are (ART applies softmax to them again) and are
      computed in log space in float64 with guards: every reward is finite for any input.
    * The bandit's preferences are shifted to max 0 after each update (softmax is shift-invariant).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_LOGIT_CAP = 1e4  # clone logits are clamped to +-this before log_softmax in the rewards


def clean_probs(y: torch.Tensor, *, eps: float) -> torch.Tensor:
    """Float64 rows on the simplex: NaN/inf removed, negatives cut, rows renormalised (uniform if ~0)."""
    y = torch.nan_to_num(y.double(), nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0)
    s = y.sum(dim=1, keepdim=True)
    uniform = torch.full_like(y, 1.0 / y.shape[1])
    return torch.where(s > eps, y / s.clamp_min(eps), uniform)


def knockoff_rewards(y: torch.Tensor, logits: torch.Tensor, y_mean: torch.Tensor, *,
                     eps: float = 1e-12) -> dict[str, float]:
    """The three adaptive-Knockoff rewards of one pull (means over its rows); always finite.

    Args:
        y: (N, K) victim probabilities (a one-hot row for a labels-only oracle).
        logits: (N, K) the clone's logits on the same images (before its update).
        y_mean: (K,) the mean victim output over recent pulls (for the diversity reward).
        eps: guard for empty / degenerate rows.

    Returns:
        ``{"cert": top1 - top2, "div": sum_k max(0, y_k - y_mean_k), "loss": -sum_k y_k log softmax(logits)_k}``.
    """
    if y.dim() != 2 or logits.shape != y.shape or y_mean.shape != y.shape[1:]:
        raise ValueError(f"shapes must be y (N, K), logits (N, K), y_mean (K,); got {tuple(y.shape)}, "
                         f"{tuple(logits.shape)}, {tuple(y_mean.shape)}")
    p = clean_probs(y, eps=eps)
    if p.shape[1] >= 2:
        top = p.topk(2, dim=1).values
        cert = top[:, 0] - top[:, 1]
    else:
        cert = torch.ones(len(p), dtype=p.dtype, device=p.device)
    ybar = torch.nan_to_num(y_mean.double().to(p.device), nan=0.0, posinf=1.0, neginf=0.0)
    div = (p - ybar).clamp_min(0.0).sum(dim=1)
    z = torch.nan_to_num(logits.double(), nan=0.0, posinf=_LOGIT_CAP, neginf=-_LOGIT_CAP).clamp(-_LOGIT_CAP, _LOGIT_CAP)
    loss = -(p * F.log_softmax(z, dim=1)).sum(dim=1)
    return {"cert": float(cert.mean()), "div": float(div.mean()), "loss": float(loss.mean())}


class OnlineZScore:
    """Online z-normalisation (Welford) of a vector of rewards; finite for any finite input.

    ``z = (r - mean) / (std + eps)`` with the statistics updated with ``r`` first (as ART), clipped to
    ``[-clip, clip]``.
    """

    def __init__(self, size: int, *, eps: float = 1e-8, clip: float = 10.0) -> None:
        self.count = 0
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.m2 = torch.zeros(size, dtype=torch.float64)
        self.eps, self.clip = eps, clip

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        r = torch.nan_to_num(r.double(), nan=0.0, posinf=1e12, neginf=-1e12).clamp(-1e12, 1e12)
        self.count += 1
        delta = r - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (r - self.mean)
        std = (self.m2 / self.count).clamp_min(0.0).sqrt()
        return ((r - self.mean) / (std + self.eps)).clamp(-self.clip, self.clip)


class GradientBandit:
    """Gradient-bandit arm selection (Sutton & Barto, section 2.8), as ART's adaptive Knockoff.

    Preferences H, policy pi = softmax(H) over the available arms, running-mean reward baseline;
    after pulling arm a with reward r: H(a) += alpha (r - rbar)(1 - pi(a)), H(b) -= alpha (r - rbar) pi(b).
    ``lr=None`` uses alpha = 1 / N(a) (ART). H is shifted to max 0 after each update (softmax is
    shift-invariant), so it stays bounded.
    """

    def __init__(self, num_arms: int, *, lr: float | None = None) -> None:
        if num_arms < 1:
            raise ValueError("a bandit needs at least one arm")
        self.h = torch.zeros(num_arms, dtype=torch.float64)
        self.pulls = torch.zeros(num_arms, dtype=torch.float64)
        self.baseline = 0.0
        self.steps = 0
        self.lr = lr

    def probs(self, available: torch.Tensor | None = None) -> torch.Tensor:
        """pi over the arms (0 for unavailable ones). Shape: (A,) float64."""
        h = self.h if available is None else self.h.masked_fill(~available, -math.inf)
        return torch.softmax(h, dim=0)

    def sample(self, generator: torch.Generator, available: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
        pi = self.probs(available)
        return int(torch.multinomial(pi, 1, generator=generator)), pi

    def update(self, arm: int, reward: float, pi: torch.Tensor) -> None:
        if not math.isfinite(reward):
            log.warning("ignoring a non-finite bandit reward %r", reward)
            return
        self.steps += 1
        self.pulls[arm] += 1
        self.baseline += (reward - self.baseline) / self.steps
        alpha = self.lr if self.lr is not None else 1.0 / float(self.pulls[arm])
        adv = reward - self.baseline
        self.h -= alpha * adv * pi
        self.h[arm] += alpha * adv
        self.h -= self.h.max()
        self.h.clamp_(min=-1e6)


__all__ = ["GradientBandit", "OnlineZScore", "knockoff_rewards", "clean_probs"]
