"""DFME that distrusts answers which change under small input perturbations (adaptive, issue 11).

Attack: DFME (Truong et al., CVPR 2021, https://arxiv.org/abs/2011.14779) by an attacker who knows a decoy
defense may be deployed. Each clone-training image is also queried ``checks`` more times with Gaussian
noise of std ``sigma`` added (clamped to [0, 1]); the clone learns only from the rows whose top-1 answer is
the same for all ``checks + 1`` queries (the others get no gradient). The extra queries are paid for:
one iteration costs ``batch_size * (g_iter * (grad_m + 1) + d_iter * (1 + checks))`` queries and the
attack runs ``budget // cost_per_iteration`` whole iterations, never more than ``budget``.

Deviations: none from DFME; the loss keeps DFME's mean over the whole batch (filtered rows contribute a
constant), so the clone's effective step shrinks with the fraction filtered.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from misleader.attacks.base import AttackResult, Evaluator, register_attack
from misleader.attacks.dfme import DFME
from misleader.attacks.dfme_adaptive import CloneWrapper, WrapsDFME, run_dfme_with
from misleader.errors import MisleaderError
from misleader.oracle import Oracle
from misleader.utils import derive_seed, make_generator


@register_attack("dfme-filtered")
class FilteringDFME(WrapsDFME):
    """DFME keeping only clone-training answers whose top-1 survives ``checks`` noisy re-queries.

    Args:
        checks: noisy re-queries per clone-training image (each paid for).
        sigma: std of the Gaussian noise, in [0, 1] pixel units.
        preset, **overrides: DFME's (see :class:`~misleader.attacks.dfme.DFME`).
    """

    requires = frozenset({"probs"})

    def __init__(self, *, checks: int = 2, sigma: float = 0.05, preset: str = "auto", **overrides: Any) -> None:
        if checks < 1 or not sigma > 0:
            raise MisleaderError(f"dfme-filtered needs checks >= 1 and sigma > 0, got {checks}, {sigma}")
        self.checks, self.sigma = int(checks), float(sigma)
        self._dfme = DFME(preset=preset, **{"fuse": False, **overrides})  # clone batches asked one by one (hooked)
        self.dfme = self._dfme.config()

    @classmethod
    def tiny_options(cls) -> dict[str, Any]:
        return {"checks": 1, **DFME.tiny_options()}

    @property
    def cost_per_iteration(self) -> int:
        c = self._dfme._cfg
        return c.batch_size * (c.g_iter * (c.grad_m + 1) + c.d_iter * (1 + self.checks))

    def iterations_for(self, budget: int) -> int:
        return budget // self.cost_per_iteration

    def run(self, oracle: Oracle, *, budget: int, clone: nn.Module, generator: torch.Generator,
            device: torch.device | str = "cpu", evaluate: Evaluator | None = None,
            eval_every: int | None = None) -> AttackResult:
        """DFME with filtered clone updates; ``iterations_for(budget) * cost_per_iteration`` queries in all."""
        self.check_oracle(oracle, budget)
        iterations = self.iterations_for(budget)
        if iterations < 1:
            raise MisleaderError(f"dfme-filtered needs at least {self.cost_per_iteration} queries for one iteration, "
                                 f"got a budget of {budget}: raise --budget or lower checks / batch_size")
        own = make_generator(derive_seed(generator))
        wrapper = CloneWrapper(clone)
        stats = {"kept": 0, "rows": 0}

        def hook(x: torch.Tensor) -> torch.Tensor:
            p = oracle.query(x)
            if not wrapper.training:
                return p
            keep = torch.ones(len(x), dtype=torch.bool)
            top = p.argmax(1).cpu()
            for _ in range(self.checks):
                noise = torch.randn(x.shape, generator=own).to(x.device, x.dtype)
                keep &= oracle.query((x + self.sigma * noise).clamp(0, 1)).argmax(1).cpu() == top
            wrapper.mask_next(x, keep)
            stats["kept"] += int(keep.sum())
            stats["rows"] += len(x)
            return p

        start = oracle.queries_used
        res = run_dfme_with(dfme=self._dfme, oracle=oracle, budget=iterations * self._dfme.cost_per_iteration,
                            clone=clone, wrapper=wrapper, hook=hook, generator=generator, device=device,
                            evaluate=evaluate, eval_every=eval_every)
        res.queries_used = oracle.queries_used - start
        if res.queries_used != iterations * self.cost_per_iteration:
            raise RuntimeError(f"dfme-filtered accounting mismatch: oracle counted {res.queries_used}, expected "
                               f"{iterations * self.cost_per_iteration}")
        res.extra.update(checks=self.checks, sigma=self.sigma, iterations=iterations,
                         cost_per_iteration=self.cost_per_iteration, unused_queries=budget - res.queries_used,
                         kept_fraction=stats["kept"] / max(1, stats["rows"]))
        return res


__all__ = ["FilteringDFME"]
