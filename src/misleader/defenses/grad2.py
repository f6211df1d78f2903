"""GRAD² gradient redirection (Mazeika et al., ICML 2022, https://arxiv.org/abs/2202.10245): an output step.

Per query batch (research note ``defenses.md`` section 2):

1. ``g(y') = grad_theta mean_i sum_k y'_ik log softmax_k(s(x_i))`` over *all* parameters of a surrogate
   ``s`` distilled from the defended model (the batch's negative cross-entropy gradient, built with
   ``create_graph=True`` at ``y' = y``);
2. a target direction ``t``: ``min_ip`` (``t = g(y)``, detached: answers whose gradient is least
   aligned with the honest one) or ``all_ones`` (``t = -1`` everywhere, the paper's main setting);
3. ``J(y') = <g(y'), t>`` is linear in ``y'``; one double backward gives ``c = dJ/dy'`` (B, K), which
   depends on the whole batch (the loss is a batch mean);
4. per row, the exact LP ``min c . y'`` s.t. ``||y' - y||_1 <= eps`` on the simplex: move
   ``m = min(eps/2, 1 - y_c0)`` to ``c0 = argmin c``, taken from the classes of largest ``c`` first
   (vectorised with a sort and a cumulative sum). ``L1 = 2m <= eps``; the argmax is not kept.

With several surrogates (the paper's MIN-IP uses four, distilled for 10/20/30/40 epochs) one is
drawn per batch from the folder's generator.

Deviations from the reference code:
    * the LP result is renormalised by a plain division (the reference's ``softmax(log(clamp(.)))``
      puts a tiny mass back on entries the LP set to zero);
    * step 1 runs outside ``inference_mode`` on clones of the batch, so the step works inside an oracle.
"""

from __future__ import annotations

import argparse
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from misleader.defenses.base import DefenseSpec, register_defense
from misleader.errors import MisleaderError
from misleader.oracle.steps import OutputStep, StepContext, register_step

TARGETS = ("min_ip", "all_ones")


def redirection_coefficients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, target: str) -> torch.Tensor:
    """``c = dJ/dy'`` (B, K) at ``y' = y`` by a batch-level double backward (see the module docstring).

    Shapes: x (B, C, H, W), y (B, K) -> (B, K) float32.
    """
    with torch.inference_mode(False), torch.enable_grad():
        # fresh leaves for the parameters: works whether or not the served model's parameters require grad
        params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
        buffers = dict(model.named_buffers())
        xv = x.clone()
        yv = y.clone().float().requires_grad_(True)
        logp = torch.log_softmax(torch.func.functional_call(model, {**params, **buffers}, (xv,)).float(), dim=1)
        loss = (yv * logp).sum(dim=1).mean()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        if target == "min_ip":
            j = sum((g * g.detach()).sum() for g in grads)
        else:
            j = -sum(g.sum() for g in grads)
        (c,) = torch.autograd.grad(j, yv)
    return c.detach()


def redirect(y: torch.Tensor, c: torch.Tensor, *, epsilon: float) -> torch.Tensor:
    """The exact per-row LP: move ``m = min(eps/2, 1 - y_c0)`` to ``c0 = argmin c`` from the largest-``c`` classes.

    Shapes: y (B, K), c (B, K) -> (B, K) on the simplex with ``||out - y||_1 = 2m <= eps``.
    """
    y = y.double()
    c0 = c.argmin(dim=1, keepdim=True)
    m = torch.minimum(torch.full_like(y[:, :1], epsilon / 2), 1 - y.gather(1, c0)).clamp_min(0)
    order = c.double().scatter(1, c0, float("-inf")).argsort(dim=1, descending=True)  # c0 last
    ys = y.gather(1, order)
    ys[:, -1] = 0  # the receiving class gives nothing
    before = ys.cumsum(dim=1) - ys  # mass available in the classes ahead of each one
    take = torch.minimum(ys, (m - before).clamp_min(0))
    out = y - torch.zeros_like(y).scatter(1, order, take)
    out = out.scatter_add(1, c0, m).clamp_min(0)
    return out / out.sum(dim=1, keepdim=True)


@register_step
class Grad2Step(OutputStep):
    """GRAD² against one or more surrogates named in the folder's ``models`` table.

    Manifest entry: ``{"kind": "output", "type": "grad2", "epsilon": 0.5, "target": "all_ones",
    "surrogates": ["grad2_s0", ...]}`` (one surrogate drawn per batch from ``ctx.generator``).

    Shape: probs (N, K), x (N, C, H, W) -> (N, K).
    """

    type_name: ClassVar[str] = "grad2"
    stochastic: ClassVar[bool] = True
    preserves_argmax: ClassVar[bool] = False
    test_spec: ClassVar[dict[str, Any] | None] = {"epsilon": 0.5, "target": "all_ones", "surrogates": ["grad2_s0"]}

    def __init__(self, *, surrogates: Sequence[nn.Module], surrogate_names: Sequence[str], epsilon: float,
                 target: str = "all_ones", generator: torch.Generator) -> None:
        if target not in TARGETS:
            raise MisleaderError(f"grad2: target must be one of {TARGETS}, got {target!r}")
        if not 0 <= epsilon <= 2:
            raise MisleaderError(f"grad2: epsilon is an L1 budget in [0, 2], got {epsilon}")
        if not surrogates or len(surrogates) != len(surrogate_names):
            raise MisleaderError("grad2: give at least one surrogate model (manifest key 'surrogates')")
        self.surrogates = [s.eval() for s in surrogates]
        self.surrogate_names = list(surrogate_names)
        self.epsilon, self.target, self.generator = float(epsilon), target, generator
        self.l1_bound = self.epsilon

    @classmethod
    def from_manifest(cls, spec: dict[str, Any], *, ctx: StepContext) -> "Grad2Step":
        for key in ("epsilon", "surrogates"):
            if key not in spec:
                raise MisleaderError(f"grad2 step: missing key {key!r} in the manifest entry")
        names = list(spec["surrogates"])
        return cls(surrogates=[ctx.load_model(n) for n in names], surrogate_names=names,
                   epsilon=float(spec["epsilon"]), target=spec.get("target", "all_ones"), generator=ctx.generator)

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": "output", "type": self.type_name, "epsilon": self.epsilon, "target": self.target,
                "surrogates": list(self.surrogate_names)}

    def __call__(self, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        i = 0
        if len(self.surrogates) > 1:
            g = self.generator
            i = int(torch.randint(0, len(self.surrogates), (1,), generator=g, device=g.device))
        c = redirection_coefficients(self.surrogates[i], x, probs, target=self.target)
        return redirect(probs, c, epsilon=self.epsilon).to(probs.device, torch.float32)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epsilon", type=float, default=0.5, help="L1 budget per answer, in [0, 2]")
    p.add_argument("--target", choices=TARGETS, default="all_ones", help="all_ones (paper's main) or min_ip")
    p.add_argument("--epochs", type=int, nargs="+", default=None,
                   help="distillation epochs, one surrogate each (default: 10 for all_ones, 10 20 30 40 for min_ip)")
    p.add_argument("--transfer", default=None,
                   help="dataset the surrogates are distilled on (default: fashion-mnist for MNIST victims, "
                        "mnist for Fashion-MNIST, cifar100 for CIFAR-10, else the defender's own split)")


def _params(a: argparse.Namespace) -> dict[str, Any]:
    return {"epsilon": a.epsilon, "target": a.target, "epochs": a.epochs, "transfer": a.transfer}


def build_grad2(*, victim, base=None, out, data_dir=None, seed: int = 0, device: str = "cpu", force: bool = False,
                epsilon: float = 0.5, target: str = "all_ones", epochs: Sequence[int] | None = None,
                transfer: str | None = None, transfer_size: int | None = None) -> dict[str, Any]:
    """Wrap ``base`` (or the victim) with GRAD²; surrogates distilled from the base on a transfer set."""
    from misleader.defenses.output_builder import distill_surrogates, finish_output_defense

    if target not in TARGETS:
        raise MisleaderError(f"grad2: target must be one of {TARGETS}, got {target!r}")
    epochs = list(epochs) if epochs else ([10] if target == "all_ones" else [10, 20, 30, 40])
    surrogates, used = distill_surrogates(victim=victim, base=base, data_dir=data_dir, seed=seed, device=device,
                                          epochs=epochs, transfer=transfer or "auto", limit=transfer_size)
    names = [f"grad2_s{i}" for i in range(len(surrogates))]
    params = {"epsilon": float(epsilon), "target": target, "epochs": epochs, "transfer": used,
              "transfer_size": transfer_size}
    step = {"kind": "output", "type": "grad2", "epsilon": float(epsilon), "target": target, "surrogates": names}
    return finish_output_defense(defense="grad2", steps=[step], models=dict(zip(names, surrogates)), params=params,
                                 victim=victim, base=base, out=out, data_dir=data_dir, seed=seed, device=device,
                                 force=force)


register_defense(DefenseSpec(
    name="grad2", build=build_grad2, add_arguments=_add_arguments, params_from_args=_params,
    paper="https://arxiv.org/abs/2202.10245", stochastic=True,
    test_params={"epsilon": 0.5, "epochs": [1], "transfer": "defender", "transfer_size": 256},
    help="GRAD²: redirect a clone's training gradient within an L1 budget (surrogates on a transfer set)",
    description=__doc__ or ""))
