"""DFME whose clone's classes are re-matched to the oracle's on a few paid real images (adaptive, issue 11).

Attack: DFME (Truong et al., CVPR 2021, https://arxiv.org/abs/2011.14779), run unchanged on all but ``real``
queries of the budget, by an attacker who suspects a *relabelling* defense: one that answers generator-like
inputs with the victim's classes permuted (the decoy variant of MISLEADER,
:mod:`misleader.defenses.misleader.decoy`). A DFME clone of such a defense learns the permuted function, and a
permutation can be undone. The last ``real`` queries ask ``real`` random images of the attacker's pool (by
default its in-distribution split, as for :mod:`misleader.attacks.dfme_seeded`); the attack matches the
clone's classes to the oracle's on them by a maximum-weight assignment of the (K, K) co-occurrence matrix
``softmax(clone(x))^T @ oracle(x)`` (:func:`best_permutation`), and relabels the clone (its last linear
layer's rows) when that raises the clone's top-1 agreement with the oracle *on those paid images*. Nothing
else is learned from them, and the test set is never used.

Against an undefended victim the matching is the identity (the clone already agrees), so the attack costs
only the ``real`` queries taken from DFME.

Deviations: none from DFME; the relabelling is this attack's own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from misleader.attacks.base import AttackResult, Evaluator, register_attack
from misleader.attacks.dfme import DFME
from misleader.attacks.dfme_adaptive import WrapsDFME
from misleader.errors import MisleaderError
from misleader.metrics import best_permutation
from misleader.oracle import Oracle
from misleader.utils import derive_seed, make_generator


def relabel_last_layer(clone: nn.Module, sigma: list[int], *, check: torch.Tensor) -> None:
    """Relabel ``clone`` in place so that its new class ``sigma[a]`` is its old class ``a``.

    Permutes the rows of the last :class:`~torch.nn.Linear` (weight and bias) and checks on ``check`` (a batch of
    inputs) that the logits came out permuted, i.e. that this layer really makes the logits.

    Raises:
        MisleaderError: the clone has no last linear layer with ``len(sigma)`` outputs that makes its logits.
    """
    linears = [m for m in clone.modules() if isinstance(m, nn.Linear)]
    k = len(sigma)
    if not linears or linears[-1].out_features != k:
        raise MisleaderError(f"dfme-relabel relabels the clone's last linear layer, which must have {k} outputs")
    inv = [0] * k
    for a, b in enumerate(sigma):
        inv[b] = a
    inv_t = torch.tensor(inv)
    layer = linears[-1]
    mode = clone.training
    clone.eval()
    with torch.no_grad():
        before = clone(check)
        layer.weight.copy_(layer.weight[inv_t.to(layer.weight.device)])
        if layer.bias is not None:
            layer.bias.copy_(layer.bias[inv_t.to(layer.bias.device)])
        after = clone(check)
    clone.train(mode)
    if not torch.allclose(after, before[:, inv_t.to(before.device)], atol=1e-5, rtol=1e-4):
        raise MisleaderError("dfme-relabel: the clone's last linear layer does not make its logits; "
                             "use a clone architecture that ends in one")


@register_attack("dfme-relabel")
class RelabelDFME(WrapsDFME):
    """DFME on ``budget - real`` queries, then the clone relabelled to match the oracle on ``real`` pool images.

    Args:
        real: real images of the pool queried at the end (10, 100, ... ; each paid for).
        preset, **overrides: DFME's (see :class:`~misleader.attacks.dfme.DFME`).
    """

    requires = frozenset({"probs"})
    needs_pool = True
    default_pool = "attacker"

    def __init__(self, *, real: int = 10, preset: str = "auto", **overrides: Any) -> None:
        if real < 1:
            raise MisleaderError(f"dfme-relabel needs real >= 1, got {real}")
        self.real = int(real)
        self._dfme = DFME(preset=preset, **overrides)
        self.dfme = self._dfme.config()

    @classmethod
    def tiny_options(cls) -> dict[str, Any]:
        return {"real": 4, **DFME.tiny_options()}

    @property
    def cost_per_iteration(self) -> int:
        return self._dfme.cost_per_iteration

    def iterations_for(self, budget: int) -> int:
        return (budget - self.real) // self.cost_per_iteration

    def run(self, oracle: Oracle, *, budget: int, clone: nn.Module, generator: torch.Generator,
            device: torch.device | str = "cpu", evaluate: Evaluator | None = None,
            eval_every: int | None = None) -> AttackResult:
        """DFME with ``budget - real`` queries, then ``real`` queries of real images; at most ``budget`` in all."""
        self.check_oracle(oracle, budget)
        if budget - self.real < self.cost_per_iteration:
            raise MisleaderError(f"dfme-relabel needs at least real + {self.cost_per_iteration} = "
                                 f"{self.real + self.cost_per_iteration} queries, got a budget of {budget}")
        pool_x, _ = self.pool_data(input_shape=oracle.input_shape)
        if len(pool_x) < self.real:
            raise MisleaderError(f"dfme-relabel: the pool has {len(pool_x)} images, fewer than real={self.real}: "
                                 "lower real or pass a larger pool")
        own = make_generator(derive_seed(generator))
        x_real = (pool_x[torch.randperm(len(pool_x), generator=own)[:self.real]].float() / 255.0).to(device)
        start = oracle.queries_used
        res = self._dfme.run(oracle, budget=budget - self.real, clone=clone, generator=generator, device=device,
                             evaluate=evaluate, eval_every=eval_every)
        answers = oracle.query(x_real).float()
        clone.eval()
        with torch.no_grad():
            p_clone = F.softmax(clone(x_real).float(), dim=1)
        sigma = best_permutation(p_clone.T @ answers)
        top = answers.argmax(1)
        before = float((p_clone.argmax(1) == top).float().mean())
        after = float((torch.tensor(sigma, device=top.device)[p_clone.argmax(1)] == top).float().mean())
        applied = after > before
        if applied:
            relabel_last_layer(clone, sigma, check=x_real)
        res.clone = clone
        res.queries_used = oracle.queries_used - start
        if evaluate is not None:  # the final clone, after its relabelling (history only)
            evaluate(clone, queries=res.queries_used, relabelled=applied, real_agreement=after if applied else before)
        res.extra.update(real=self.real, permutation=sigma, relabelled=applied, real_agreement_before=before,
                         real_agreement_after=after if applied else before)
        return res


__all__ = ["RelabelDFME", "best_permutation", "relabel_last_layer"]
