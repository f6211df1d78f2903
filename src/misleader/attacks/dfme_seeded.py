"""DFME seeded with a few real in-distribution images mixed into its clone-training queries (adaptive, issue 11).

Attack: DFME (Truong et al., CVPR 2021, https://arxiv.org/abs/2011.14779), run unchanged, except that in
every clone-training batch a fraction ``mix`` of the generated images is replaced by one of ``seeds`` real
images from the attacker's pool (default: the in-distribution attacker split), randomly shifted by up to
``shift`` pixels. The replaced rows are what is queried *and* what the clone trains on, so the attacker
pays for them like any other query and the budget is DFME's exactly (``budget // cost_per_iteration``
whole iterations). The generator's zeroth-order probes are untouched. Against a decoy defense (which
answers generator-like inputs with relabelled classes) the real images carry the true labels.

Deviations: none from DFME (``misleader.attacks.dfme``); the mixing is this attack's own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from misleader.attacks.base import AttackResult, Evaluator, register_attack
from misleader.attacks.dfme import DFME
from misleader.attacks.dfme_adaptive import CloneWrapper, WrapsDFME, run_dfme_with
from misleader.errors import MisleaderError
from misleader.oracle import Oracle
from misleader.utils import derive_seed, make_generator


def random_shift(x: torch.Tensor, *, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` (N, C, H, W) translated by integers in ``[-shift, shift]`` (zero fill)."""
    if shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    off = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator).to(x.device)
    rows = (off[:, 0, None] + torch.arange(h, device=x.device))[:, :, None]  # (N, H, 1)
    cols = (off[:, 1, None] + torch.arange(w, device=x.device))[:, None, :]  # (N, 1, W)
    # one gather for the whole batch: (N, H, W, C) -> (N, C, H, W)
    index = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[index, rows, cols].permute(0, 3, 1, 2).contiguous()


@register_attack("dfme-seeded")
class SeededDFME(WrapsDFME):
    """DFME with ``seeds`` real images mixed into a fraction ``mix`` of each clone-training batch.

    Args:
        seeds: real images taken (at random) from the pool (10, 100, 1,000 in issue 11).
        mix: fraction of each clone-training batch replaced by (shifted) seed images, in (0, 1].
        shift: largest random translation of a seed image, in pixels.
        preset, **overrides: DFME's (see :class:`~misleader.attacks.dfme.DFME`).
    """

    requires = frozenset({"probs"})
    needs_pool = True
    default_pool = "attacker"

    def __init__(self, *, seeds: int = 100, mix: float = 0.25, shift: int = 2, preset: str = "auto",
                 **overrides: Any) -> None:
        if seeds < 1 or not 0 < mix <= 1 or shift < 0:
            raise MisleaderError(f"dfme-seeded needs seeds >= 1, 0 < mix <= 1 and shift >= 0, got {seeds}, {mix}, "
                                 f"{shift}")
        self.seeds, self.mix, self.shift = int(seeds), float(mix), int(shift)
        self._dfme = DFME(preset=preset, **{"fuse": False, **overrides})  # clone batches asked one by one (hooked)
        self.dfme = self._dfme.config()

    @classmethod
    def tiny_options(cls) -> dict[str, Any]:
        return {"seeds": 4, **DFME.tiny_options()}

    @property
    def cost_per_iteration(self) -> int:
        return self._dfme.cost_per_iteration

    def run(self, oracle: Oracle, *, budget: int, clone: nn.Module, generator: torch.Generator,
            device: torch.device | str = "cpu", evaluate: Evaluator | None = None,
            eval_every: int | None = None) -> AttackResult:
        """DFME with real seed images mixed in; exactly DFME's queries (``budget // cost_per_iteration`` iterations)."""
        self.check_oracle(oracle, budget)
        pool_x, _ = self.pool_data(input_shape=oracle.input_shape)
        if len(pool_x) < self.seeds:
            raise MisleaderError(f"dfme-seeded: the pool has {len(pool_x)} images, fewer than seeds={self.seeds}: "
                                 "lower seeds or pass a larger pool")
        own = make_generator(derive_seed(generator))
        real = pool_x[torch.randperm(len(pool_x), generator=own)[:self.seeds]].float() / 255.0
        wrapper = CloneWrapper(clone)
        stats = {"mixed": 0}

        def hook(x: torch.Tensor) -> torch.Tensor:
            if not wrapper.training:
                return oracle.query(x)
            k = max(1, round(self.mix * len(x)))
            pick = torch.randint(len(real), (k,), generator=own)
            x_new = x.clone()
            x_new[:k] = random_shift(real[pick], shift=self.shift, generator=own).to(x.device, x.dtype)
            wrapper.replace_next(x, x_new)
            stats["mixed"] += k
            return oracle.query(x_new)

        start = oracle.queries_used
        res = run_dfme_with(dfme=self._dfme, oracle=oracle, budget=budget, clone=clone, wrapper=wrapper, hook=hook,
                            generator=generator, device=device, evaluate=evaluate, eval_every=eval_every)
        res.queries_used = oracle.queries_used - start
        res.extra.update(seeds=self.seeds, mix=self.mix, real_queries=stats["mixed"])
        return res


__all__ = ["SeededDFME", "random_shift"]
