"""RandP: random perturbation of the answered probabilities (an output step and its builder).

Two published forms (research note ``defenses.md`` section 1a):

* ``form="mass"`` (default; Mazeika et al., ICML 2022, https://arxiv.org/abs/2202.10245,
  ``batch_training/defenses.py::method_rand_perturbation``): per row pick a target ``t`` uniformly
  among the non-argmax classes and answer ``(1 - eps/2) y + (eps/2) e_t``. The row stays on the simplex
  and ``||y' - y||_1 = eps (1 - y_t) <= eps``; the argmax flips once ``eps/2`` exceeds the top-1 margin.
* ``form="logit"`` (Orekondy et al., ICLR 2020, https://arxiv.org/abs/1906.10908,
  ``defenses/victim/bb_randnoise.py``): ``z = log(y / (1 - y))``; noise ``d`` drawn uniform on
  ``[0, 2 eps / K^(1/p)]`` (or standard normal), projected onto the L1 (or L2) ball of radius ``eps``
  with the sort-based projection; answer ``sigmoid(z + d)`` renormalised. Here ``eps`` is a logit-space
  radius: the probability-space L1 is not bounded (``l1_bound`` is ``None``), only measured.

Deviations from the reference code:
    * the target class and the noise come from the folder's seeded generator (reproducible answers);
    * ``y`` is clamped to ``[1e-7, 1 - 1e-7]`` before the inverse sigmoid in the logit form (the
      reference divides by zero on exact 0/1 entries).
"""

from __future__ import annotations

import argparse
from typing import Any, ClassVar

import torch

from misleader.defenses.base import DefenseSpec, register_defense
from misleader.errors import MisleaderError
from misleader.oracle.steps import OutputStep, StepContext, register_step

FORMS = ("mass", "logit")
DISTS = ("l1", "l2")
STRATS = ("uniform", "gaussian")


def project_l1_ball(v: torch.Tensor, *, radius: float) -> torch.Tensor:
    """Euclidean projection of every row of ``v`` (N, D) onto the L1 ball of ``radius`` (Duchi et al. 2008).

    Rows already inside the ball are returned unchanged; the others become
    ``sign(v) * max(|v| - theta, 0)`` with ``theta`` from a sort and a cumulative sum.
    """
    a = v.abs()
    inside = a.sum(dim=1) <= radius
    mu = a.sort(dim=1, descending=True).values
    cs = mu.cumsum(dim=1)
    ar = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    cond = mu - (cs - radius) / ar > 0
    rho = cond.to(v.dtype).mul(ar).argmax(dim=1, keepdim=True)  # last index where cond holds
    theta = (cs.gather(1, rho) - radius) / (rho + 1).to(v.dtype)
    proj = v.sign() * (a - theta).clamp_min(0)
    return torch.where(inside[:, None], v, proj)


def project_l2_ball(v: torch.Tensor, *, radius: float) -> torch.Tensor:
    """Rows of ``v`` (N, D) scaled down onto the L2 ball of ``radius`` where they lie outside it."""
    norm = v.norm(dim=1, keepdim=True)
    return v * (radius / norm.clamp_min(1e-12)).clamp(max=1.0)


def random_other_class(probs: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """(N,) int64: per row a class drawn uniformly among the K - 1 classes other than the argmax."""
    n, k = probs.shape
    top = probs.argmax(dim=1)
    r = torch.randint(0, k - 1, (n,), generator=generator, device=generator.device).to(probs.device)
    return r + (r >= top).long()


@register_step
class RandPStep(OutputStep):
    """Random perturbation (``form`` ``mass`` or ``logit``), see the module docstring.

    Manifest entry: ``{"kind": "output", "type": "randp", "epsilon": 0.5, "form": "mass",
    "dist": "l1", "strat": "uniform"}`` (``dist``/``strat`` only matter for ``form="logit"``).

    Shape: probs (N, K), x (N, C, H, W) -> (N, K).
    """

    type_name: ClassVar[str] = "randp"
    stochastic: ClassVar[bool] = True
    preserves_argmax: ClassVar[bool] = False
    test_spec: ClassVar[dict[str, Any] | None] = {"epsilon": 0.5, "form": "mass"}

    def __init__(self, *, epsilon: float, form: str = "mass", dist: str = "l1", strat: str = "uniform",
                 generator: torch.Generator) -> None:
        if form not in FORMS or dist not in DISTS or strat not in STRATS:
            raise MisleaderError(f"randp: form must be one of {FORMS}, dist one of {DISTS}, strat one of {STRATS} "
                                 f"(got {form!r}, {dist!r}, {strat!r})")
        if not (epsilon >= 0 and (form == "logit" or epsilon <= 2)):
            raise MisleaderError(f"randp: epsilon must be in [0, 2] for form mass (>= 0 for logit), got {epsilon}")
        self.epsilon, self.form, self.dist, self.strat = float(epsilon), form, dist, strat
        self.generator = generator
        self.l1_bound = self.epsilon if form == "mass" else None

    @classmethod
    def from_manifest(cls, spec: dict[str, Any], *, ctx: StepContext) -> "RandPStep":
        if "epsilon" not in spec:
            raise MisleaderError("randp step: missing key 'epsilon' in the manifest entry")
        return cls(epsilon=float(spec["epsilon"]), form=spec.get("form", "mass"), dist=spec.get("dist", "l1"),
                   strat=spec.get("strat", "uniform"), generator=ctx.generator)

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": "output", "type": self.type_name, "epsilon": self.epsilon, "form": self.form,
                "dist": self.dist, "strat": self.strat}

    def __call__(self, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = probs.float()
        if self.form == "mass":
            t = random_other_class(y, generator=self.generator)
            out = y * (1 - self.epsilon / 2)
            return out.scatter_add(1, t[:, None], torch.full_like(y[:, :1], self.epsilon / 2))
        return self._logit_noise(y)

    def _logit_noise(self, y: torch.Tensor) -> torch.Tensor:
        n, k = y.shape
        yc = y.double().clamp(1e-7, 1 - 1e-7)
        z = torch.log(yc / (1 - yc))
        g = self.generator
        if self.strat == "uniform":
            p = 1.0 if self.dist == "l1" else 2.0
            hi = 2 * self.epsilon / k ** (1 / p)
            d = torch.rand((n, k), generator=g, device=g.device, dtype=torch.float64).to(y.device) * hi
        else:
            d = torch.randn((n, k), generator=g, device=g.device, dtype=torch.float64).to(y.device)
        project = project_l1_ball if self.dist == "l1" else project_l2_ball
        d = project(d, radius=self.epsilon)
        out = torch.sigmoid(z + d)
        return (out / out.sum(dim=1, keepdim=True)).float()


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epsilon", type=float, default=0.5, help="L1 budget (mass form) or logit-space radius (logit form)")
    p.add_argument("--form", choices=FORMS, default="mass", help="mass: Mazeika's L1-budgeted form; logit: Orekondy's")
    p.add_argument("--dist", choices=DISTS, default="l1", help="logit form: ball the noise is projected onto")
    p.add_argument("--strat", choices=STRATS, default="uniform", help="logit form: noise distribution")


def _params(a: argparse.Namespace) -> dict[str, Any]:
    return {"epsilon": a.epsilon, "form": a.form, "dist": a.dist, "strat": a.strat}


def build_randp(*, victim, base=None, out, data_dir=None, seed: int = 0, device: str = "cpu", force: bool = False,
                epsilon: float = 0.5, form: str = "mass", dist: str = "l1", strat: str = "uniform") -> dict[str, Any]:
    """Wrap ``base`` (or the victim) with a RandP output step; returns the folder's ``result.json`` dict."""
    from misleader.defenses.output_builder import finish_output_defense

    params = {"epsilon": float(epsilon), "form": form, "dist": dist, "strat": strat}
    step = {"kind": "output", "type": "randp", **params}
    RandPStep(epsilon=epsilon, form=form, dist=dist, strat=strat, generator=torch.Generator())  # validate early
    return finish_output_defense(defense="randp", steps=[step], models=None, params=params, victim=victim, base=base,
                                 out=out, data_dir=data_dir, seed=seed, device=device, force=force)


register_defense(DefenseSpec(
    name="randp", build=build_randp, add_arguments=_add_arguments, params_from_args=_params,
    paper="https://arxiv.org/abs/2202.10245", stochastic=True, test_params={"epsilon": 0.5},
    help="RandP: move eps/2 of probability mass to a random non-argmax class (or logit-space noise)",
    description=__doc__ or ""))
