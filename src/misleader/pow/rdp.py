"""Rényi-DP accounting of the GNMax aggregator (PATE 2018), used as a per-query leakage score.

Papers: Papernot et al., "Scalable Private Learning with PATE", ICLR 2018,
https://arxiv.org/abs/1802.08908 (Theorem 6, Propositions 7, 8, 10); Mironov, "Rényi Differential
Privacy", 2017 (RDP -> (epsilon, delta)). As used by Dziedzic et al., ICLR 2022,
https://arxiv.org/abs/2201.09243 (``analysis/rdp_cumulative.py``, ``analysis/pate.py``).

GNMax adds N(0, sigma^2) to each class's vote count and answers the noisy argmax. For one query with
vote histogram ``n`` (K classes):

* ``log q`` bounds Pr[noisy argmax != argmax] by a union bound of Gaussian tails at the vote gaps
  with scale sqrt(2)*sigma (Prop. 7), capped at log(1 - 1/K);
* the data-independent RDP of order lambda is lambda / sigma^2 (Prop. 8);
* the data-dependent RDP (Thm 6 with the higher orders mu1, mu2 of Prop. 10) applies where its
  conditions hold, and is always capped by the data-independent value;
* epsilon at delta = min over orders of RDP(lambda) + log(1/delta) / (lambda - 1).

Deviations from the reference code: float64 torch instead of numpy/scipy (``log_ndtr`` for the
Gaussian log-tail); the private-kNN meter uses the same capped bound (the reference's kNN default is
the uncapped data-dependent value).
"""

from __future__ import annotations

import math

import torch

#: the reference's orders: 2..100 in steps of 0.5, plus 200 log-spaced values up to 1000
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [2 + 0.5 * i for i in range(197)] + [float(v) for v in torch.logspace(math.log10(100.5), 3, 200, dtype=torch.float64)]
)


def log1mexp(x: float) -> float:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x."""
    if x > 0:
        raise ValueError(f"log1mexp needs x <= 0, got {x}")
    if x < -1:
        return math.log1p(-math.exp(x))
    if x < 0:
        return math.log(-math.expm1(x))
    return -math.inf


def log_q_gnmax(counts: torch.Tensor, *, sigma: float) -> float:
    """Upper bound on log Pr[GNMax answer != plurality] for one vote histogram (Prop. 7).

    Args:
        counts: (K,) vote counts.
        sigma: standard deviation of the Gaussian noise added to each count.
    """
    c = counts.double().flatten()
    k = c.numel()
    top = int(c.argmax())
    gaps = (c[top] - c)[torch.arange(k) != top]
    # log Pr[N(0, 2 sigma^2) >= gap] = log Phi(-gap / (sqrt(2) sigma))
    logq = float(torch.logsumexp(torch.special.log_ndtr(-gaps / (math.sqrt(2.0) * sigma)), 0))
    return min(logq, math.log(1.0 - 1.0 / k))


def rdp_data_independent(*, sigma: float, orders: torch.Tensor) -> torch.Tensor:
    """lambda / sigma^2 for each order (Prop. 8). Shape: (L,) -> (L,)."""
    if sigma <= 0 or bool((orders < 1).any()):
        raise ValueError("sigma must be > 0 and orders >= 1")
    return orders.double() / sigma**2


def rdp_gnmax(logq: float, *, sigma: float, orders: torch.Tensor) -> torch.Tensor:
    """Data-dependent RDP of GNMax for each order, capped by the data-independent value (Thm 6, Prop. 10).

    Args:
        logq: :func:`log_q_gnmax` of the query (<= 0).
        orders: (L,) orders > 1.

    Returns:
        (L,) float64 RDP values.
    """
    orders = orders.double()
    if logq > 0 or sigma <= 0 or bool((orders <= 1).any()):
        raise ValueError("logq must be <= 0, sigma > 0, orders > 1")
    if logq == -math.inf:
        return torch.zeros_like(orders)
    var = sigma**2
    ret = orders / var
    mu2 = math.sqrt(var * -logq)
    mu1 = mu2 + 1
    mask = (orders < mu1) & (mu2 > 1)
    if not bool(mask.any()):
        return ret
    rdp1, rdp2 = mu1 / var, mu2 / var
    log_a2 = (mu2 - 1) * rdp2
    if logq <= log_a2 - mu2 * (math.log(1 + 1 / (mu1 - 1)) + math.log(1 + 1 / (mu2 - 1))) and -logq > rdp2:
        log1q = log1mexp(logq)
        log_a = (orders - 1) * (log1q - log1mexp((logq + rdp2) * (1 - 1 / mu2)))
        log_b = (orders - 1) * (rdp1 - logq / (mu1 - 1))
        log_s = torch.logaddexp(log1q + log_a, logq + log_b)
        ret = torch.where(mask, torch.minimum(ret, log_s / (orders - 1)), ret)
    return ret


def eps_from_rdp(rdp: torch.Tensor, *, orders: torch.Tensor, delta: float) -> tuple[float, float]:
    """(epsilon, best order) at ``delta``: min over orders of rdp + log(1/delta) / (order - 1)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    eps = rdp.double() + math.log(1 / delta) / (orders.double() - 1)
    i = int(eps.argmin())
    return float(eps[i]), float(orders[i])


def gnmax_epsilon(counts: torch.Tensor, *, sigma: float, delta: float,
                  orders: torch.Tensor | None = None) -> torch.Tensor:
    """Per-query epsilon of GNMax for each row of a vote matrix.

    Shape: (N, K) counts -> (N,) float64 epsilon (each row scored on its own, as the reference's server).
    """
    orders = torch.tensor(DEFAULT_ORDERS, dtype=torch.float64) if orders is None else orders.double()
    cache: dict[tuple, float] = {}
    out = torch.empty(counts.shape[0], dtype=torch.float64)
    for i, row in enumerate(counts):
        key = tuple(sorted(row.tolist()))  # epsilon depends only on the multiset of counts
        if key not in cache:
            rdp = rdp_gnmax(log_q_gnmax(row, sigma=sigma), sigma=sigma, orders=orders)
            cache[key] = eps_from_rdp(rdp, orders=orders, delta=delta)[0]
        out[i] = cache[key]
    return out
