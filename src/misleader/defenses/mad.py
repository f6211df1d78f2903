"""MAD / prediction poisoning (Orekondy et al., ICLR 2020, https://arxiv.org/abs/1906.10908): an output step.

For a query ``x`` with answer ``y`` (K,), MAD looks at the gradient a clone would take on ``x``:
``G`` (K x D), row ``k`` = gradient of ``-log softmax_k(s(x))`` w.r.t. the surrogate ``s``'s last Linear
weight. It picks a target ``y*`` (the *oracle*) that maximises the deviation of ``G^T y*`` from ``G^T y``
and answers ``y' = (1 - a) y + a y*`` with ``a = clamp(eps / ||y - y*||_1, 0, 1)`` (line search), so
``||y' - y||_1 = min(eps, ||y - y*||_1)`` and ``y'`` stays on the simplex.

Closed form (research note ``defenses.md`` 1b): ``G_k = (p_s - e_k) (x) h`` with ``p_s`` the surrogate's
softmax and ``h`` its penultimate features, so ``G^T v = (p_s - v) (x) h`` for a probability vector ``v``:

* ``objective="angular"`` (the README setting, ``objmax=True``):
  ``|| G^T y*/||G^T y*|| - G^T y/||G^T y|| ||^2 = || (p_s - y*)/||p_s - y*|| - (p_s - y)/||p_s - y|| ||^2``;
* ``objective="plain"`` (``objmax=False``): ``||G^T (y* - y)||^2 = ||y* - y||^2 ||h||^2``.

The batched path (:meth:`MADStep.__call__`) needs one surrogate forward and a (B, candidates, K)
tensor operation; :func:`mad_reference` is the slow per-example path with the explicit autograd
Jacobian that the tests compare it against.

Oracles: ``extreme`` (candidates: the K one-hot vectors) and ``argmax`` (candidates: uniform over a
class subset that contains ``argmax y``, +1e-5 on the argmax; all 2^(K-1) subsets for K <= 10, a greedy
set-growing search with at most ``max_evals`` evaluations above), which keeps the argmax.

Deviations from the reference code:
    * batched closed form instead of K backward passes per example (same objective values);
    * ``argmax`` candidates are renormalised after the +1e-5 (the reference leaves them summing to
      1 + 1e-5, so its answers leave the simplex by up to 1e-5);
    * the surrogate's last Linear layer is found by type (the reference takes ``params[-2]``, which
      is the weight only when the layer has a bias); the bias gradient is ignored as there;
    * norms are clamped at 1e-12 (the reference divides by zero when ``h = 0``);
    * only the ``linesearch`` projection (the reference's ``projections`` mode is broken, ``kl`` is a
      bisection we do not need for an L1 budget).
"""

from __future__ import annotations

import argparse
import functools
import itertools
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from misleader.defenses.base import DefenseSpec, register_defense
from misleader.errors import MisleaderError
from misleader.oracle.steps import OutputStep, StepContext, register_step

ORACLES = ("extreme", "argmax")
OBJECTIVES = ("angular", "plain")
#: K up to which the ``argmax`` oracle enumerates every subset (2^(K-1) candidates)
ENUM_MAX_K = 10
#: the reference's +1e-5 on the argmax of ``argmax`` candidates
ARGMAX_BONUS = 1e-5

#: candidates (M, K) shared by all rows or (B, M, K) -> objective values (B, M), higher is better
Score = Callable[[torch.Tensor], torch.Tensor]
#: perm (B, K) or None -> the Score of candidates whose column j is class ``perm[:, j]`` (None: class j)
ScoreFactory = Callable[[torch.Tensor | None], Score]


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``model`` (in module order): the layer MAD differentiates."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise MisleaderError(f"MAD needs a surrogate whose last layer is nn.Linear; {type(model).__name__} has none")
    return layers[-1]


def surrogate_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p_s (N, K), h (N, F))``: the surrogate's softmax and the input of its last Linear layer."""
    seen: list[torch.Tensor] = []
    handle = last_linear(model).register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return torch.softmax(logits.double(), dim=1), seen[-1].double().flatten(1)


@functools.lru_cache(maxsize=16)
def argmax_candidates(k: int) -> torch.Tensor:
    """(2^(k-1), k) float64, in top-first coordinates (column 0 = the argmax class): uniform over every
    class subset that contains column 0, +1e-5 on column 0, renormalised. First row: the one-hot of column 0."""
    rows = [(True, *r[::-1]) for r in itertools.product((False, True), repeat=k - 1)]
    return _uniform_on(torch.tensor(rows, dtype=torch.bool), top=0)


def _uniform_on(mask: torch.Tensor, *, top: int | torch.Tensor) -> torch.Tensor:
    """Candidates (..., M, K) uniform over ``mask`` with the argmax bonus on class ``top``, renormalised."""
    c = mask.double()
    c = c / c.sum(dim=-1, keepdim=True)
    if isinstance(top, int):
        c[..., top] += ARGMAX_BONUS
    else:  # (B,) per row, mask (B, M, K)
        c.scatter_add_(2, top[:, None, None].expand(-1, c.shape[1], 1), torch.full_like(c[..., :1], ARGMAX_BONUS))
    return c / c.sum(dim=-1, keepdim=True)


def top_first(y: torch.Tensor) -> torch.Tensor:
    """(B, K) int64 permutation per row: the argmax class first, then the others in increasing order."""
    b, k = y.shape
    top = y.argmax(dim=1, keepdim=True)
    others = torch.arange(k, device=y.device).expand(b, k)
    return torch.cat([top, others[others != top].view(b, k - 1)], dim=1)


def as_simplex(y: torch.Tensor) -> torch.Tensor:
    """``y`` (B, K) in float64, renormalised: the closed form needs ``sum(y) = 1`` exactly (float32 rows are off
    by ~1e-7, which shifts ``G^T y`` by ``(sum(y) - 1) p_s (x) h`` and can reorder near-tied candidates)."""
    y = y.double().clamp_min(0)
    return y / y.sum(dim=1, keepdim=True)


def first_best(scores: torch.Tensor, *, rtol: float = 1e-12) -> torch.Tensor:
    """(B,) index of the first candidate whose score (B, M) is within ``rtol`` of the row's best.

    Candidates tied to within rounding (e.g. the ``plain`` objective on a confident answer whose other
    classes all hold ~1e-20) are broken by candidate order, not by rounding noise, so the closed form and
    the autograd reference choose the same one.
    """
    best = scores.max(dim=1, keepdim=True).values
    near = scores >= best - rtol * best.abs()
    return near.to(torch.uint8).argmax(dim=1)


def oracle_target(y: torch.Tensor, make_score: ScoreFactory, *, oracle: str, max_evals: int = 1024) -> torch.Tensor:
    """The target ``y*`` (B, K) of each row: the candidate with the highest objective (ties: the first).

    Args:
        y: (B, K) float64 answers.
        make_score: builds the objective for candidates in a given class order (see :data:`ScoreFactory`).
        oracle: ``extreme`` (the K one-hot vectors) or ``argmax`` (see the module docstring).
        max_evals: ``argmax`` with K > 10: the greedy search's evaluation budget per row.
    """
    b, k = y.shape
    if oracle == "extreme":
        perm, cands = None, torch.eye(k, dtype=torch.float64, device=y.device)
    elif k <= ENUM_MAX_K:  # every row scores the same candidate matrix in its own top-first order
        perm, cands = top_first(y), argmax_candidates(k).to(y.device)
    else:
        return _greedy_target(y, make_score(None), max_evals=max_evals)
    chosen = cands[first_best(make_score(perm)(cands))]  # (B, K)
    return chosen if perm is None else torch.zeros_like(y).scatter(1, perm, chosen)


def _greedy_target(y: torch.Tensor, score: Score, *, max_evals: int) -> torch.Tensor:
    """K > 10: grow the class set from ``{argmax}`` one class at a time (the best addition each round)."""
    b, k = y.shape
    top = y.argmax(dim=1)
    rows = torch.arange(b, device=y.device)
    mask = torch.zeros(b, k, dtype=torch.bool, device=y.device)
    mask[rows, top] = True
    best = _uniform_on(mask[:, None], top=top)[:, 0]
    best_score = score(best[:, None])[:, 0]
    evals = 1
    eye = torch.eye(k, dtype=torch.bool, device=y.device)
    while evals + k <= max_evals and not bool(mask.all()):
        grown = mask[:, None, :] | eye[None]  # (B, K, K): add class j
        valid = ~mask  # adding a class already in the set is not a move
        s = score(_uniform_on(grown, top=top)).masked_fill(~valid, float("-inf"))
        evals += k
        j = first_best(s)
        has_move = valid.any(dim=1)
        mask = torch.where(has_move[:, None], grown[rows, j], mask)
        s_best = s[rows, j]
        better = has_move & (s_best > best_score)
        cand = _uniform_on(mask[:, None], top=top)[:, 0]
        best = torch.where(better[:, None], cand, best)
        best_score = torch.where(better, s_best, best_score)
    return best


def line_search(y: torch.Tensor, target: torch.Tensor, *, epsilon: float) -> torch.Tensor:
    """``(1 - a) y + a y*`` with ``a = clamp(eps / ||y - y*||_1, 0, 1)``: L1 = min(eps, ||y - y*||_1)."""
    dist = (y - target).abs().sum(dim=1, keepdim=True)
    alpha = (epsilon / dist.clamp_min(1e-12)).clamp(0, 1)
    return (1 - alpha) * y + alpha * target


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _dots(c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, M): candidate . row vector, for candidates (M, K) or (B, M, K) and rows v (B, K)."""
    return v @ c.T if c.dim() == 2 else torch.matmul(c, v.unsqueeze(-1)).squeeze(-1)


def closed_form_score(p_s: torch.Tensor, h: torch.Tensor, y: torch.Tensor, *, objective: str) -> ScoreFactory:
    """The MAD objective from the closed form ``G^T v = (p_s - v) (x) h`` (no Jacobian), in dot products.

    angular: ``2 - 2 cos(p_s - c, p_s - y)`` (= the squared distance of the unit vectors); plain:
    ``||c - y||^2 ||h||^2``. Shapes: p_s, y (B, K), h (B, F).
    """
    hn2 = h.pow(2).sum(dim=1, keepdim=True)  # (B, 1)

    def make(perm: torch.Tensor | None) -> Score:
        ps, yy = (p_s, y) if perm is None else (p_s.gather(1, perm), y.gather(1, perm))
        if objective == "angular":
            v = ps - yy
            pv, pp, nv = (ps * v).sum(1, keepdim=True), (ps * ps).sum(1, keepdim=True), v.norm(dim=1, keepdim=True)

            def angular(c: torch.Tensor) -> torch.Tensor:
                n2 = pp - 2 * _dots(c, ps) + c.pow(2).sum(dim=-1)  # ||p_s - c||^2
                cos = (pv - _dots(c, v)) / (n2.clamp_min(0).sqrt().clamp_min(1e-12) * nv.clamp_min(1e-12))
                return 2 - 2 * cos

            return angular
        yn2 = yy.pow(2).sum(dim=1, keepdim=True)
        return lambda c: (c.pow(2).sum(dim=-1) - 2 * _dots(c, yy) + yn2) * hn2

    return make


def mad_batched(y: torch.Tensor, p_s: torch.Tensor, h: torch.Tensor, *, epsilon: float, oracle: str,
                objective: str, max_evals: int = 1024) -> torch.Tensor:
    """MAD's answer (B, K) float64 for answers ``y`` (B, K), surrogate softmax ``p_s`` (B, K), features ``h`` (B, F)."""
    y, p_s, h = as_simplex(y), p_s.double(), h.double()
    target = oracle_target(y, closed_form_score(p_s, h, y, objective=objective), oracle=oracle, max_evals=max_evals)
    return line_search(y, target, epsilon=epsilon)


def jacobian_last_layer(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(K, D): row k = d(-log softmax_k(model(x)))/d(last Linear weight), flattened; ``x`` is one row (1, C, H, W)."""
    w = last_linear(model).weight
    with torch.inference_mode(False), torch.enable_grad():
        logp = torch.log_softmax(model(x.clone()), dim=1)[0]
        rows = [torch.autograd.grad(-logp[k], w, retain_graph=True)[0].flatten() for k in range(logp.shape[0])]
    return torch.stack(rows).double()


def mad_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epsilon: float, oracle: str,
                  objective: str, max_evals: int = 1024) -> torch.Tensor:
    """The slow reference: one example at a time, explicit autograd Jacobian ``G`` (K, D), objective on ``G^T v``.

    Shapes: x (N, C, H, W), y (N, K) -> (N, K) float64. Used by the tests and the benchmark only.
    """
    out = []
    for i in range(len(x)):
        g = jacobian_last_layer(model, x[i : i + 1])  # (K, D)
        yi = as_simplex(y[i : i + 1])

        def make(perm: torch.Tensor | None, g: torch.Tensor = g, yi: torch.Tensor = yi) -> Score:
            gp = g if perm is None else g[perm[0]]
            gy = (yi if perm is None else yi.gather(1, perm)) @ gp  # (1, D)

            def score(c: torch.Tensor) -> torch.Tensor:
                gc = torch.matmul(c, gp).reshape(1, -1, gp.shape[1])  # (1, M, D)
                if objective == "angular":
                    return (_unit(gc) - _unit(gy)[:, None]).pow(2).sum(dim=-1)
                return (gc - gy[:, None]).pow(2).sum(dim=-1)

            return score

        target = oracle_target(yi, make, oracle=oracle, max_evals=max_evals)
        out.append(line_search(yi, target, epsilon=epsilon))
    return torch.cat(out)


@register_step
class MADStep(OutputStep):
    """MAD prediction poisoning against a surrogate model named in the folder's ``models`` table.

    Manifest entry: ``{"kind": "output", "type": "mad", "epsilon": 0.5, "oracle": "extreme",
    "objective": "angular", "surrogate": "mad_surrogate", "max_evals": 1024}``.

    ``preserves_argmax`` is ``True`` on instances built with ``oracle="argmax"``.

    Shape: probs (N, K), x (N, C, H, W) -> (N, K).
    """

    type_name: ClassVar[str] = "mad"
    stochastic: ClassVar[bool] = False
    preserves_argmax: ClassVar[bool] = False
    test_spec: ClassVar[dict[str, Any] | None] = {"epsilon": 0.5, "oracle": "argmax", "objective": "angular",
                                                  "surrogate": "mad_surrogate"}

    def __init__(self, *, surrogate: nn.Module, surrogate_name: str, epsilon: float, oracle: str = "extreme",
                 objective: str = "angular", max_evals: int = 1024) -> None:
        if oracle not in ORACLES or objective not in OBJECTIVES:
            raise MisleaderError(f"mad: oracle must be one of {ORACLES} and objective one of {OBJECTIVES} "
                                 f"(got {oracle!r}, {objective!r})")
        if not 0 <= epsilon <= 2:
            raise MisleaderError(f"mad: epsilon is an L1 budget in [0, 2], got {epsilon}")
        last_linear(surrogate)
        self.surrogate, self.surrogate_name = surrogate.eval(), surrogate_name
        self.epsilon, self.oracle, self.objective, self.max_evals = float(epsilon), oracle, objective, int(max_evals)
        self.l1_bound = self.epsilon
        self.preserves_argmax = oracle == "argmax"  # type: ignore[misc]  (per instance: depends on the oracle)

    @classmethod
    def from_manifest(cls, spec: dict[str, Any], *, ctx: StepContext) -> "MADStep":
        for key in ("epsilon", "surrogate"):
            if key not in spec:
                raise MisleaderError(f"mad step: missing key {key!r} in the manifest entry")
        return cls(surrogate=ctx.load_model(spec["surrogate"]), surrogate_name=spec["surrogate"],
                   epsilon=float(spec["epsilon"]), oracle=spec.get("oracle", "extreme"),
                   objective=spec.get("objective", "angular"), max_evals=int(spec.get("max_evals", 1024)))

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": "output", "type": self.type_name, "epsilon": self.epsilon, "oracle": self.oracle,
                "objective": self.objective, "surrogate": self.surrogate_name, "max_evals": self.max_evals}

    def __call__(self, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            p_s, h = surrogate_features(self.surrogate, x)
        out = mad_batched(probs.to(p_s.device), p_s, h, epsilon=self.epsilon, oracle=self.oracle,
                          objective=self.objective, max_evals=self.max_evals)
        return out.to(probs.device, torch.float32)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epsilon", type=float, default=0.5, help="L1 budget per answer, in [0, 2]")
    p.add_argument("--oracle", choices=ORACLES, default="extreme", help="argmax keeps the top-1 class")
    p.add_argument("--objective", choices=OBJECTIVES, default="angular", help="angular (README) or plain")
    p.add_argument("--surrogate-init", choices=("random", "distilled"), default="random",
                   help="random: a fresh copy of the victim's architecture (as the reference); distilled: trained "
                        "on the base's answers over the defender's training split")
    p.add_argument("--epochs", type=int, default=2, help="distillation epochs (--surrogate-init distilled)")


def _params(a: argparse.Namespace) -> dict[str, Any]:
    return {"epsilon": a.epsilon, "oracle": a.oracle, "objective": a.objective, "surrogate_init": a.surrogate_init,
            "epochs": a.epochs}


def build_mad(*, victim, base=None, out, data_dir=None, seed: int = 0, device: str = "cpu", force: bool = False,
              epsilon: float = 0.5, oracle: str = "extreme", objective: str = "angular",
              surrogate_init: str = "random", epochs: int = 2, max_evals: int = 1024) -> dict[str, Any]:
    """Wrap ``base`` (or the victim) with MAD; the surrogate is a random (or distilled) copy of the victim's arch."""
    from misleader.defenses.output_builder import distill_surrogates, finish_output_defense, random_victim_copy

    if surrogate_init not in ("random", "distilled"):
        raise MisleaderError(f"mad: surrogate_init must be random or distilled, got {surrogate_init!r}")
    if surrogate_init == "random":
        surrogate = random_victim_copy(victim=victim, seed=seed)
    else:
        surrogate = distill_surrogates(victim=victim, base=base, data_dir=data_dir, seed=seed, device=device,
                                       epochs=[epochs], transfer="defender")[0][0]
    MADStep(surrogate=surrogate, surrogate_name="mad_surrogate", epsilon=epsilon, oracle=oracle, objective=objective)
    params = {"epsilon": float(epsilon), "oracle": oracle, "objective": objective, "surrogate_init": surrogate_init,
              "epochs": int(epochs), "max_evals": int(max_evals)}
    step = {"kind": "output", "type": "mad", "epsilon": float(epsilon), "oracle": oracle, "objective": objective,
            "surrogate": "mad_surrogate", "max_evals": int(max_evals)}
    return finish_output_defense(defense="mad", steps=[step], models={"mad_surrogate": surrogate}, params=params,
                                 victim=victim, base=base, out=out, data_dir=data_dir, seed=seed, device=device,
                                 force=force)


register_defense(DefenseSpec(
    name="mad", build=build_mad, add_arguments=_add_arguments, params_from_args=_params,
    paper="https://arxiv.org/abs/1906.10908", test_params={"epsilon": 0.5, "oracle": "argmax"},
    help="MAD (prediction poisoning): steer a clone's gradient away within an L1 budget",
    description=__doc__ or ""))
