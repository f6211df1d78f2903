"""Adaptive DFME attackers against decoy defenses (issue 11): what they share.

Both adaptive attacks run the unchanged DFME loop (:class:`misleader.attacks.dfme.DFME`, Truong et al.,
CVPR 2021, https://arxiv.org/abs/2011.14779) and change only its *clone-training* queries, through two
thin wrappers the attack owns:

* :class:`QueryProxy`, the oracle DFME sees: forwards every query to the real oracle through a hook and
  counts the rows DFME asked for (DFME checks its own accounting against that count); the real oracle
  counts every row actually paid for, including any extra queries a hook makes;
* :class:`CloneWrapper`, the clone DFME trains: the real clone, plus a per-batch edit the hook arranges
  (replace rows of the batch it is about to train on, or stop the gradient of rows).

DFME's clone-training queries are recognised by the clone being in train mode (DFME puts it in eval mode
for the generator's zeroth-order probes, whose perturbed points must not be altered).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from misleader.attacks.base import Attack
from misleader.oracle import Oracle


class WrapsDFME(Attack):
    """An attack that runs an inner :class:`~misleader.attacks.dfme.DFME` (``self._dfme``).

    :meth:`adapt_to_target` hands the target's public description to the inner DFME too, so that its
    ``preset="auto"`` and its image map (the dataset's public normalisation statistics) are resolved for the
    target exactly as a plain DFME's are (without it the inner DFME knew no dataset and generated in
    ``(x + 1) / 2``).
    """

    _dfme: Any

    def adapt_to_target(self, meta: dict[str, Any]) -> None:
        super().adapt_to_target(meta)
        self._dfme.adapt_to_target(meta)
        self.dfme = self._dfme.config()


class CloneWrapper(nn.Module):
    """The clone as DFME trains it; a pending edit for the next forward of exactly the tensor it was made for."""

    def __init__(self, clone: nn.Module) -> None:
        super().__init__()
        self.inner = clone
        self._pending: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None

    def replace_next(self, x: torch.Tensor, x_new: torch.Tensor) -> None:
        """The next forward of ``x`` (the same tensor object) runs on ``x_new`` instead."""
        self._pending = (x, x_new, None)

    def mask_next(self, x: torch.Tensor, keep: torch.Tensor) -> None:
        """The next forward of ``x`` passes gradients only through the rows where ``keep`` (N,) is True."""
        self._pending = (x, None, keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pend, self._pending = self._pending, None
        if pend is None or pend[0] is not x:
            return self.inner(x)
        _, x_new, keep = pend
        out = self.inner(x_new if x_new is not None else x)
        if keep is not None:
            out = torch.where(keep.to(out.device)[:, None], out, out.detach())
        return out


class QueryProxy:
    """The oracle DFME sees: ``query`` goes through ``hook(x) -> probs``; ``queries_used`` counts DFME's rows."""

    def __init__(self, oracle: Oracle, hook: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._oracle, self._hook, self._asked = oracle, hook, 0

    output = property(lambda self: self._oracle.output)
    input_shape = property(lambda self: self._oracle.input_shape)
    num_classes = property(lambda self: self._oracle.num_classes)
    remaining = property(lambda self: None)
    queries_used = property(lambda self: self._asked)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        self._asked += int(x.shape[0])
        return self._hook(x)


def run_dfme_with(*, dfme: Any, oracle: Oracle, budget: int, clone: nn.Module, wrapper: CloneWrapper,
                  hook: Callable[[torch.Tensor], torch.Tensor], generator: torch.Generator, device: torch.device | str,
                  evaluate: Any, eval_every: int | None) -> Any:
    """Run ``dfme`` with ``budget`` DFME rows against ``QueryProxy(oracle, hook)``, training ``wrapper``."""
    proxy = QueryProxy(oracle, hook)
    ev = None
    if evaluate is not None:
        def ev(_c: nn.Module, *, queries: int, **fields: Any) -> None:  # report the real queries paid
            evaluate(clone, queries=oracle.queries_used - start, dfme_rows=queries, **fields)
    start = oracle.queries_used
    res = dfme.run(proxy, budget=budget, clone=wrapper, generator=generator, device=device, evaluate=ev,
                   eval_every=eval_every)
    res.clone = clone
    return res


__all__ = ["CloneWrapper", "QueryProxy", "WrapsDFME", "run_dfme_with"]
