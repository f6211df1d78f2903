"""Output postprocessors as pipeline steps: reverse sigmoid, rounding, top-k, labels only, Gaussian noise.

Torch re-implementations of the postprocessors of the Adversarial Robustness Toolbox
(``art/defences/postprocessor/``, research note ``defenses.md`` 6b); reverse sigmoid is from
Lee et al., "Defending against NN model stealing attacks using deceptive perturbations"
(IEEE S&P Workshops 2019, https://ieeexplore.ieee.org/document/8844598). Every step answers rows on
the simplex.

Deviations from the reference code (ART):
    * ``labels``: a per-row one-hot (ART's ``ClassLabels`` writes ``labels[:, argmaxes] = 1``, setting
      every row's winning columns for the whole batch; its fix PR #2824 is unmerged);
    * ``top_k``: the kept entries are renormalised and the argmax is always kept, so no row is all zero
      (ART's ``HighConfidence`` zeroes entries below a cutoff without renormalising);
    * ``round``: largest-remainder rounding to ``decimals``, so rows still sum to 1 (``np.around`` rows
      do not, and can become all zero);
    * ``gaussian``: noise from the folder's seeded generator; a row whose entries all clamp to zero
      becomes the one-hot of its noisy argmax (ART divides by zero);
    * ``reverse_sigmoid``: computed in float64 (in float32 the ART clip ``1 - 1e-9`` rounds to 1).
"""

from __future__ import annotations

import argparse
from typing import Any, ClassVar

import torch

from misleader.defenses.base import DefenseSpec, register_defense
from misleader.errors import MisleaderError
from misleader.oracle.steps import OutputStep, StepContext, register_step


def _renormalise(p: torch.Tensor) -> torch.Tensor:
    return p / p.sum(dim=1, keepdim=True)


def one_hot_rows(index: torch.Tensor, *, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """(N, K) with a 1 at ``index[i]`` of row ``i`` (a per-row scatter)."""
    return torch.zeros(len(index), num_classes, dtype=like.dtype, device=like.device).scatter_(1, index[:, None], 1.0)


class _Postprocessor(OutputStep):
    """Shared manifest handling: ``PARAMS`` names the step's parameters and their types."""

    PARAMS: ClassVar[dict[str, type]] = {}

    @classmethod
    def from_manifest(cls, spec: dict[str, Any], *, ctx: StepContext) -> "OutputStep":
        unknown = set(spec) - set(cls.PARAMS) - {"kind", "type"}
        if unknown:
            raise MisleaderError(f"{cls.type_name} step: unknown keys {sorted(unknown)}; it takes {sorted(cls.PARAMS)}")
        kwargs = {k: t(spec[k]) for k, t in cls.PARAMS.items() if spec.get(k) is not None}
        return cls(**kwargs, num_classes=ctx.num_classes, generator=ctx.generator)

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": "output", "type": self.type_name, **{k: getattr(self, k) for k in self.PARAMS}}


@register_step
class ReverseSigmoidStep(_Postprocessor):
    """``y' = clip(p - beta (sigmoid(gamma logit p) - 1/2), 0, 1)`` renormalised, ``p`` clipped to [1e-9, 1 - 1e-9].

    Shape: probs (N, K), x (N, C, H, W) -> (N, K).
    """

    type_name: ClassVar[str] = "reverse_sigmoid"
    PARAMS: ClassVar[dict[str, type]] = {"beta": float, "gamma": float}
    test_spec: ClassVar[dict[str, Any] | None] = {"beta": 1.0, "gamma": 0.1}

    def __init__(self, *, beta: float = 1.0, gamma: float = 0.1, num_classes: int, generator: torch.Generator | None = None) -> None:
        if beta < 0 or gamma <= 0:
            raise MisleaderError(f"reverse_sigmoid: need beta >= 0 and gamma > 0, got beta={beta}, gamma={gamma}")
        self.beta, self.gamma = float(beta), float(gamma)

    def __call__(self, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        p = probs.double().clamp(1e-9, 1 - 1e-9)
        r = self.beta * (torch.sigmoid(self.gamma * torch.log(p / (1 - p))) - 0.5)
        return _renormalise((p - r).clamp(0, 1)).float()


@register_step
class RoundStep(_Postprocessor):
    """Probabilities rounded to ``decimals`` by largest remainder (rows keep summing to 1).

    Each entry moves by less than ``10^-decimals``. Shape: probs (N, K) -> (N, K).
    """

    type_name: ClassVar[str] = "round"
    PARAMS: ClassVar[dict[str, type]] = {"decimals": int}
    test_spec: ClassVar[dict[str, Any] | None] = {"decimals": 2}

    def __init__(self, *, decimals: int = 3, num_classes: int, generator: torch.Generator | None = None) -> None:
        if decimals < 0:
            raise MisleaderError(f"round: decimals must be >= 0, got {decimals}")
        self.decimals = int(decimals)
        self.l1_bound = min(2.0, num_classes * 10.0 ** -self.decimals)

    def __call__(self, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        scale = 10 ** self.decimals
        p = _renormalise(probs.double().clamp_min(0)) * scale
        units = p.floor()
        rest = p - units
        missing = (scale - units.sum(dim=1)).round().long().clamp(0, p.shape[1])  # in [0, K)
        rank = rest.argsort(dim=1, descending=True).argsort(dim=1)  # 0 = largest remainder
        units = units + (rank < missing[:, None]).double()
        return (units / scale).float()


@register_step
class TopKStep(_Postprocessor):
    """Keep the ``k`` largest entries of each row, renormalised.

    ``cutoff`` > 0 also drops kept entries below it (ART's ``HighConfidence``); the argmax is always kept,
    so no row is all zero. Shape: probs (N, K) -> (N, K).
    """

    type_name: ClassVar[str] = "top_k"
    preserves_argmax: ClassVar[bool] = True
    PARAMS: ClassVar[dict[str, type]] = {"k": int, "cutoff": float}
    test_spec: ClassVar[dict[str, Any] | None] = {"k": 3}

    def __init__(self, *, k: int = 1, cutoff: float = 0.0, num_classes: int, generator: torch.Generator | None = None) -> None:
        if not 1 <= k or not 0 <= cutoff <= 1:
            raise MisleaderError(f"top_k: need k >= 1 and cutoff in [0, 1], got k={k}, cutoff={cutoff}")
        self.k, self.cutoff = int(k), float(cutoff)
        # the kept mass is at least min(k, K)/K, and at least the argmax's 1/K with a cutoff
        keep = 1.0 / num_classes if self.cutoff > 0 else min(self.k, num_classes) / num_classes
        self.l1_bound = 2 * (1 - keep)

    def __call__(self, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        p = probs.double().clamp_min(0)
        k = min(self.k, p.shape[1])
        keep = torch.zeros_like(p, dtype=torch.bool).scatter_(1, p.topk(k, dim=1).indices, True)
        keep &= p >= self.cutoff
        keep.scatter_(1, p.argmax(dim=1, keepdim=True), True)
        return _renormalise(p * keep).float()


@register_step
class LabelsStep(_Postprocessor):
    """Labels only: the one-hot of each row's own argmax. Shape: probs (N, K) -> (N, K)."""

    type_name: ClassVar[str] = "labels"
    preserves_argmax: ClassVar[bool] = True
    test_spec: ClassVar[dict[str, Any] | None] = {}

    def __init__(self, *, num_classes: int, generator: torch.Generator | None = None) -> None:
        self.l1_bound = 2 * (1 - 1 / num_classes)

    def __call__(self, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return one_hot_rows(probs.argmax(dim=1), num_classes=probs.shape[1], like=probs.float())


@register_step
class GaussianStep(_Postprocessor):
    """``y + N(0, scale^2)`` from the folder's generator, clamped at 0 and renormalised.

    Shape: probs (N, K) -> (N, K).
    """

    type_name: ClassVar[str] = "gaussian"
    stochastic: ClassVar[bool] = True
    PARAMS: ClassVar[dict[str, type]] = {"scale": float}
    test_spec: ClassVar[dict[str, Any] | None] = {"scale": 0.2}

    def __init__(self, *, scale: float = 0.2, num_classes: int, generator: torch.Generator) -> None:
        if scale < 0:
            raise MisleaderError(f"gaussian: scale must be >= 0, got {scale}")
        self.scale, self.generator = float(scale), generator

    def __call__(self, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        g = self.generator
        noise = torch.randn(probs.shape, generator=g, device=g.device, dtype=torch.float64).to(probs.device)
        noisy = probs.double() + self.scale * noise
        kept = noisy.clamp_min(0)
        dead = kept.sum(dim=1, keepdim=True) <= 0
        fallback = one_hot_rows(noisy.argmax(dim=1), num_classes=probs.shape[1], like=noisy)
        return _renormalise(torch.where(dead, fallback, kept)).float()


#: CLI op name -> (step type, its parameters' CLI flags)
OPS: dict[str, str] = {"reverse-sigmoid": "reverse_sigmoid", "round": "round", "top-k": "top_k", "labels": "labels",
                       "gaussian": "gaussian"}
_STEP_CLASSES: dict[str, type[_Postprocessor]] = {c.type_name: c for c in
                                                  (ReverseSigmoidStep, RoundStep, TopKStep, LabelsStep, GaussianStep)}


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", choices=sorted(OPS), required=True, help="which postprocessor")
    p.add_argument("--beta", type=float, default=None, help="reverse-sigmoid: strength (default 1.0)")
    p.add_argument("--gamma", type=float, default=None, help="reverse-sigmoid: slope (default 0.1)")
    p.add_argument("--decimals", type=int, default=None, help="round: decimals kept (default 3)")
    p.add_argument("--k", type=int, default=None, help="top-k: entries kept (default 1)")
    p.add_argument("--cutoff", type=float, default=None, help="top-k: also drop entries below this (default 0)")
    p.add_argument("--scale", type=float, default=None, help="gaussian: noise standard deviation (default 0.2)")


def _params(a: argparse.Namespace) -> dict[str, Any]:
    out = {"op": a.op}
    for key in ("beta", "gamma", "decimals", "k", "cutoff", "scale"):
        if getattr(a, key) is not None:
            out[key] = getattr(a, key)
    return out


def post_step(*, op: str, num_classes: int, **params: Any) -> dict[str, Any]:
    """The manifest entry of postprocessor ``op`` with ``params`` (checked by building the step once)."""
    if op not in OPS:
        raise MisleaderError(f"post: unknown --op {op!r}; choose one of {', '.join(sorted(OPS))}")
    cls = _STEP_CLASSES[OPS[op]]
    extra = set(params) - set(cls.PARAMS)
    if extra:
        raise MisleaderError(f"post --op {op}: parameters {sorted(extra)} do not apply; it takes {sorted(cls.PARAMS)}")
    step = cls(**{k: cls.PARAMS[k](v) for k, v in params.items()}, num_classes=num_classes, generator=torch.Generator())
    return step.to_manifest()


def build_post(*, victim, base=None, out, data_dir=None, seed: int = 0, device: str = "cpu", force: bool = False,
               op: str, **op_params: Any) -> dict[str, Any]:
    """Wrap ``base`` (or the victim) with one postprocessor; returns the folder's ``result.json`` dict."""
    from misleader.defenses.output_builder import finish_output_defense, victim_meta

    step = post_step(op=op, num_classes=int(victim_meta(victim)["num_classes"]), **op_params)
    params = {"op": op, **{k: v for k, v in step.items() if k not in ("kind", "type")}}
    return finish_output_defense(defense="post", steps=[step], models=None, params=params, victim=victim, base=base,
                                 out=out, data_dir=data_dir, seed=seed, device=device, force=force)


def check_post_params(*, op: str, **op_params: Any) -> None:
    """Spec validation (misleader.experiments.spec): the step of ``op`` builds with ``op_params`` (10 classes)."""
    try:
        post_step(op=op, num_classes=10, **op_params)
    except (TypeError, ValueError) as exc:
        raise MisleaderError(f"post --op {op}: {exc}") from None


build_post.check_params = check_post_params  # type: ignore[attr-defined]


register_defense(DefenseSpec(
    name="post", build=build_post, add_arguments=_add_arguments, params_from_args=_params,
    paper="https://ieeexplore.ieee.org/document/8844598", stochastic=True,  # --op gaussian draws noise
    test_params={"op": "reverse-sigmoid", "beta": 0.5, "gamma": 0.2},
    help="output postprocessor: reverse-sigmoid, round, top-k, labels or gaussian",
    description=__doc__ or ""))
