"""Backend steps: inputs -> probabilities. ``model`` (one classifier) and ``ensemble`` (soft voting).

Both answer in float32 without autocast: ``softmax(model(x).float())``, so that reduced precision never
swamps zeroth-order attacks' finite differences, and a format-1 folder (``combine: mean_softmax``)
answers bit-identically to :class:`misleader.oracle.base.EnsembleOracle`, which computed it the same way
(members in order, each softmax times its normalised weight, summed).

Manifest entries::

    {"kind": "backend", "type": "model", "model": "victim"}
    {"kind": "backend", "type": "ensemble", "models": ["m1", "m2"], "weights": [0.5, 0.5] | null}
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from misleader.errors import MisleaderError
from misleader.oracle.steps import BackendStep, StepContext, register_step


def _names(spec: dict[str, Any], key: str) -> list[str]:
    v = spec.get(key)
    if not isinstance(v, list) or not v or not all(isinstance(n, str) for n in v):
        raise MisleaderError(f"backend step: {key!r} must be a non-empty list of model names, got {v!r}")
    return v


def normalised_weights(weights: Any, n: int) -> torch.Tensor:
    """(n,) float32 weights summing to 1 (equal when ``weights`` is None); one-line error when invalid."""
    if weights is None:
        w = torch.ones(n)
    else:
        ok = (isinstance(weights, (list, tuple)) and len(weights) == n
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in weights))
        w = torch.tensor([float(v) for v in weights], dtype=torch.float32) if ok else None
        if w is None or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise MisleaderError(f"ensemble weights must be {n} non-negative numbers, not all zero; got {weights!r}")
    return w / w.sum()


@register_step
class ModelBackend(BackendStep):
    """One classifier's softmax: (N, C, H, W) -> (N, K)."""

    type_name: ClassVar[str] = "model"
    test_spec: ClassVar[dict[str, Any] | None] = {"model": "m0"}

    def __init__(self, model: nn.Module, *, name: str, device: torch.device) -> None:
        self.__model = model
        self.__device = device
        self.name = name

    @classmethod
    def from_manifest(cls, spec: dict[str, Any], *, ctx: StepContext) -> "ModelBackend":
        name = spec.get("model")
        if not isinstance(name, str):
            raise MisleaderError(f"backend step 'model': 'model' must be a model name, got {name!r}")
        return cls(ctx.forward_model(name), name=name, device=ctx.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.__model(x.to(self.__device, non_blocking=True).float())
        return torch.softmax(logits.float(), dim=1)

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": "backend", "type": self.type_name, "model": self.name}


@register_step
class EnsembleBackend(BackendStep):
    """Soft voting: sum over members of ``weight_m * softmax(model_m(x))`` (weights normalised to 1)."""

    type_name: ClassVar[str] = "ensemble"
    test_spec: ClassVar[dict[str, Any] | None] = {"models": ["m0", "m1"], "weights": [1.0, 3.0]}

    def __init__(self, models: list[nn.Module], *, names: list[str], weights: list[float] | None,
                 device: torch.device) -> None:
        self.__models = list(models)
        self.__device = device
        self.names = list(names)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.__w = normalised_weights(self.weights, len(self.__models)).to(device)

    @classmethod
    def from_manifest(cls, spec: dict[str, Any], *, ctx: StepContext) -> "EnsembleBackend":
        names = _names(spec, "models")
        weights = spec.get("weights")
        normalised_weights(weights, len(names))  # validate before loading anything
        return cls([ctx.forward_model(n) for n in names], names=names, weights=weights, device=ctx.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.__device, non_blocking=True).float()
        out = None
        for w, m in zip(self.__w, self.__models):
            p = torch.softmax(m(x).float(), dim=1) * w
            out = p if out is None else out + p
        return out

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": "backend", "type": self.type_name, "models": list(self.names), "weights": self.weights}


__all__ = ["EnsembleBackend", "ModelBackend", "normalised_weights"]
