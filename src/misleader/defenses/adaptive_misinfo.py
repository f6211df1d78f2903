"""Adaptive Misinformation (Kariyappa & Qureshi, CVPR 2020, https://arxiv.org/abs/1911.07100): a soft gate.

Serve (research note ``defenses.md`` 6a): with ``s(x)`` the top-1 probability of an outlier-exposure
(OE) trained *detector* (the defender's head; without one, the top-1 of the answer being gated),

    alpha = sigmoid(nu (tau - s(x))),     y' = (1 - alpha) y + alpha softmax(f_mis(x)),

so confident (in-distribution) queries get ``y`` and out-of-distribution ones get the misinformation
model ``f_mis``, trained to put almost no mass on the true class. The pipeline mixes the rows with the
gate's :meth:`AdaptiveMisinfoGate.weight` (``hard = False``).

Train (the builder): detector and misinformation model share the victim's architecture and are
trained together for ``epochs`` on the defender's training split plus an OE set (Fashion-MNIST for
MNIST victims, MNIST for Fashion-MNIST, CIFAR-100 for CIFAR-10, uniform-noise images for ``digits``):
detector ``CE(ID) + lambda CE(OE logits, uniform)``; misinformation ``NLL(log(1 - softmax), target)``
with targets = ID labels and the detector's argmax on OE inputs.

Deviations from the reference code:
    * the gate wraps any base: the answer mixed is the base pipeline's ``y`` (in the reference the
      OE-trained defender is itself the answering model);
    * the CPU default is 2 epochs with Adam (the reference: 20 epochs SGD lr 0.1 step 10 on MNIST).
"""

from __future__ import annotations

import argparse
from typing import Any, ClassVar

import torch
from torch import nn

from misleader.defenses.base import DefenseSpec, register_defense
from misleader.errors import MisleaderError
from misleader.oracle.steps import GateStep, StepContext, register_step


@register_step
class AdaptiveMisinfoGate(GateStep):
    """Soft gate ``alpha = sigmoid(nu (tau - max y))`` towards ``softmax(f_mis(x))``.

    Manifest entry: ``{"kind": "gate", "type": "adaptive_misinfo", "tau": 0.9, "nu": 1000.0,
    "misinfo": "am_misinfo", "detector": "am_detector" | null}``.

    Shapes: ``weight(probs (N, K), x (N, C, H, W)) -> (N,)``; ``branch(x) -> (N, K)``.
    """

    type_name: ClassVar[str] = "adaptive_misinfo"
    hard: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False
    test_spec: ClassVar[dict[str, Any] | None] = {"tau": 0.9, "nu": 1000.0, "misinfo": "am_misinfo",
                                                  "detector": "am_detector"}

    def __init__(self, *, misinfo: nn.Module, misinfo_name: str, tau: float, nu: float,
                 detector: nn.Module | None = None, detector_name: str | None = None) -> None:
        if not 0 <= tau <= 1 or nu <= 0:
            raise MisleaderError(f"adaptive_misinfo: need tau in [0, 1] and nu > 0, got tau={tau}, nu={nu}")
        self.misinfo, self.misinfo_name = misinfo.eval(), misinfo_name
        self.detector, self.detector_name = (detector.eval() if detector is not None else None), detector_name
        self.tau, self.nu = float(tau), float(nu)

    @classmethod
    def from_manifest(cls, spec: dict[str, Any], *, ctx: StepContext) -> "AdaptiveMisinfoGate":
        for key in ("tau", "misinfo"):
            if key not in spec:
                raise MisleaderError(f"adaptive_misinfo gate: missing key {key!r} in the manifest entry")
        det = spec.get("detector")
        return cls(misinfo=ctx.load_model(spec["misinfo"]), misinfo_name=spec["misinfo"], tau=float(spec["tau"]),
                   nu=float(spec.get("nu", 1000.0)), detector=ctx.load_model(det) if det else None, detector_name=det)

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": "gate", "type": self.type_name, "tau": self.tau, "nu": self.nu, "misinfo": self.misinfo_name,
                "detector": self.detector_name}

    def score(self, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(N,): the top-1 probability the gate thresholds (the detector's, else the answer's)."""
        if self.detector is None:
            return probs.float().max(dim=1).values
        with torch.no_grad():
            return torch.softmax(self.detector(x).float(), dim=1).max(dim=1).values.to(probs.device)

    def weight(self, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.nu * (self.tau - self.score(probs, x)))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(self.misinfo(x).float(), dim=1)

    def apply(self, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``(1 - alpha) y + alpha softmax(f_mis(x))`` (N, K): what the pipeline computes from this gate."""
        a = self.weight(probs, x)[:, None]
        return (1 - a) * probs.float() + a * self.branch(x).to(probs.device)


def misinformation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``NLL(log(1 - softmax(logits)), target)``: push the target class's probability to 0. logits (B, K), target (B,)."""
    p = torch.softmax(logits.float(), dim=1)
    return nn.functional.nll_loss(torch.log((1 - p).clamp_min(1e-6)), target)


def oe_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, K) to the uniform distribution (outlier exposure)."""
    return -torch.log_softmax(logits.float(), dim=1).mean(dim=1).mean()


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tau", type=float, default=0.9, help="top-1 threshold below which answers turn to misinformation")
    p.add_argument("--nu", type=float, default=1000.0, help="gate sharpness (reference: 10000; Mazeika: 1000)")
    p.add_argument("--epochs", type=int, default=2, help="joint training epochs of detector and misinformation model")
    p.add_argument("--oe", default=None, help="outlier-exposure dataset (default: fashion-mnist for MNIST victims, "
                                              "mnist for Fashion-MNIST, cifar100 for CIFAR-10, noise for digits)")
    p.add_argument("--oe-lambda", type=float, default=1.0, help="weight of the OE term")


def _params(a: argparse.Namespace) -> dict[str, Any]:
    return {"tau": a.tau, "nu": a.nu, "epochs": a.epochs, "oe": a.oe, "oe_lambda": a.oe_lambda}


def build_am(*, victim, base=None, out, data_dir=None, seed: int = 0, device: str = "cpu", force: bool = False,
             tau: float = 0.9, nu: float = 1000.0, epochs: int = 2, oe: str | None = None, oe_lambda: float = 1.0,
             limit: int | None = None) -> dict[str, Any]:
    """Train the OE detector and misinformation model, then gate ``base`` (or the victim) with them."""
    from misleader.defenses.output_builder import finish_output_defense, train_adaptive_misinfo

    detector, misinfo, oe_used = train_adaptive_misinfo(victim=victim, data_dir=data_dir, seed=seed, device=device,
                                                        epochs=epochs, oe=oe or "auto", oe_lambda=oe_lambda,
                                                        limit=limit)
    gate = AdaptiveMisinfoGate(misinfo=misinfo, misinfo_name="am_misinfo", tau=tau, nu=nu, detector=detector,
                               detector_name="am_detector")
    params = {"tau": float(tau), "nu": float(nu), "epochs": int(epochs), "oe": oe_used, "oe_lambda": float(oe_lambda),
              "limit": limit}
    return finish_output_defense(defense="am", steps=[gate.to_manifest()],
                                 models={"am_detector": detector, "am_misinfo": misinfo}, params=params, victim=victim,
                                 base=base, out=out, data_dir=data_dir, seed=seed, device=device, force=force)


register_defense(DefenseSpec(
    name="am", build=build_am, add_arguments=_add_arguments, params_from_args=_params,
    paper="https://arxiv.org/abs/1911.07100", test_params={"tau": 0.9, "epochs": 1, "limit": 256},
    help="Adaptive Misinformation: answer out-of-distribution queries with a misinformation model",
    description=__doc__ or ""))
