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

The batched path (:meth:`MADStep.__call__`) needs one surrogate forward (``p_s`` and ``h`` from it) and,
per quadratic form of the objective, one (B, K+2) x (K+2, candidates) product. On CPU the forward runs in
:data:`CPU_CHUNK`-row pieces with channels-last conv weights (the step converts its surrogate in place,
:func:`prepare_surrogate`) and the oracle in :data:`ORACLE_CHUNK`-row pieces; the answers do not depend
on either. On 1,000 MNIST queries with a LeNet5 surrogate (one thread) the forward is most of the time:
see ``bench/bench_output_defenses.py``.

:func:`mad_reference` is the slow per-example path the tests compare against, structured as the reference
code: per query, the explicit autograd Jacobian (one forward, one ``autograd.grad`` per class, as its
``compute_jacobian_nll``), then the oracle's loop over candidates, then the line search. Its loop is in
NumPy float64 for both oracles (the reference's ``argmax`` oracle loops in NumPy, its ``extreme`` one in
torch) and computes ``G^T y`` once per query (the reference recomputes it for every candidate); both
choices only make the reference faster.

Oracles: ``extreme`` (candidates: the K one-hot vectors) and ``argmax`` (candidates: uniform over a
class subset that contains ``argmax y``, +1e-5 on the argmax; all 2^(K-1) subsets for K <= 10, a greedy
set-growing search with at most ``max_evals`` evaluations above), which keeps the argmax.

Deviations from the reference code:
    * batched closed form instead of K backward passes per example (same objective values);
    * all computations of the objective in float64 (the reference: float32), and near-ties (within 1e-12
      relative) go to the first candidate (the reference: the first strict maximum);
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

import numpy as np
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


#: rows per surrogate forward on CPU: a LeNet5's first feature maps for 256 rows stay in cache (the forward on
#: 1,000 rows in one piece is ~1.5x slower on one thread)
CPU_CHUNK = 256


def surrogate_features(model: nn.Module, x: torch.Tensor, *,
                       chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p_s (N, K), h (N, F))`` float64: the surrogate's softmax and the input of its last Linear layer, from
    one forward (in ``chunk``-row pieces when given; None: one piece)."""
    seen: list[torch.Tensor] = []
    handle = last_linear(model).register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    try:
        logits = torch.cat([model(xb) for xb in (x.split(chunk) if chunk else (x,))])
    finally:
        handle.remove()
    return torch.softmax(logits.double(), dim=1), torch.cat(seen).double().flatten(1)


def prepare_surrogate(model: nn.Module) -> nn.Module:
    """``model`` in eval mode and, on CPU, with channels-last conv weights (in place): oneDNN's NHWC convolutions
    make a LeNet5 forward ~1.6x faster on one thread; a model without conv weights is unchanged."""
    model.eval()
    params = list(model.parameters())
    if params and params[0].device.type == "cpu" and any(p.dim() == 4 for p in params):
        model.to(memory_format=torch.channels_last)
    return model


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
    top = y.argmax(dim=1, keepdim=True)
    rest = torch.arange(y.shape[1] - 1, device=y.device).expand(len(y), -1)
    return torch.cat([top, rest + (rest >= top)], dim=1)  # column j >= 1: class j - 1, or j past the top


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

    Candidates shared by all rows (M, K) (``extreme``, enumerated ``argmax``): each quadratic form is one
    (B, K+2) x (K+2, M) product of row and candidate vectors augmented with their squared norms, then a
    few in-place (B, M) passes. Per-row candidates (B, M, K) (the greedy search): batched products.
    """
    hn2 = h.pow(2).sum(dim=1, keepdim=True)  # (B, 1)

    def make(perm: torch.Tensor | None) -> Score:
        ps, yy = (p_s, y) if perm is None else (p_s.gather(1, perm), y.gather(1, perm))
        ones = torch.ones_like(hn2)
        if objective == "angular":
            v = ps - yy
            nv = v.norm(dim=1, keepdim=True).clamp_min(1e-12)
            pv, pp = (ps * v).sum(1, keepdim=True), (ps * ps).sum(1, keepdim=True)
            rows_n2 = torch.cat([ps, pp, ones], dim=1)  # . [-2c, 1, |c|^2] = ||p_s - c||^2
            rows_num = torch.cat([v, pv], dim=1) / nv  # . [-c, 1] = (p_s - c) . v / ||v||

            def angular(c: torch.Tensor) -> torch.Tensor:
                if c.dim() == 3:
                    n2 = pp - 2 * _dots(c, ps) + c.pow(2).sum(dim=-1)
                    return 2 - 2 * (pv - _dots(c, v)) / (n2.clamp_min(0).sqrt().clamp_min(1e-12) * nv)
                one = torch.ones_like(c[:, :1])
                den = (rows_n2 @ torch.cat([-2 * c, one, c.pow(2).sum(1, keepdim=True)], dim=1).T)
                den = den.clamp_(min=1e-24).sqrt_()  # = max(||p_s - c||, 1e-12)
                return torch.addcdiv(torch.full_like(c[:1, 0], 2.0), rows_num @ torch.cat([-c, one], 1).T, den,
                                     value=-2)

            return angular
        yn2 = yy.pow(2).sum(dim=1, keepdim=True)
        rows = torch.cat([-2 * yy, yn2, ones], dim=1) * hn2  # . [c, 1, |c|^2] = ||c - y||^2 ||h||^2

        def plain(c: torch.Tensor) -> torch.Tensor:
            if c.dim() == 3:
                return (c.pow(2).sum(dim=-1) - 2 * _dots(c, yy) + yn2) * hn2
            return rows @ torch.cat([c, torch.ones_like(c[:, :1]), c.pow(2).sum(1, keepdim=True)], dim=1).T

        return plain

    return make


#: rows per oracle pass on CPU: the (256, 512) float64 scores of the ``argmax`` oracle (1 MB) stay in a core's
#: L2 cache (on 1,000 rows in one piece the passes over 4 MB arrays were ~1.8x slower on one thread)
ORACLE_CHUNK = 256


def mad_batched(y: torch.Tensor, p_s: torch.Tensor, h: torch.Tensor, *, epsilon: float, oracle: str,
                objective: str, max_evals: int = 1024, chunk: int | None = None) -> torch.Tensor:
    """MAD's answer (B, K) float64 for answers ``y`` (B, K), surrogate softmax ``p_s`` (B, K), features ``h`` (B, F).

    The oracle runs on ``chunk`` rows at a time (None: :data:`ORACLE_CHUNK` on CPU, all rows on other devices);
    rows are independent, so the answer does not depend on it.
    """
    y, p_s, h = as_simplex(y), p_s.double(), h.double()
    if chunk is None:
        chunk = ORACLE_CHUNK if y.device.type == "cpu" else max(len(y), 1)
    target = torch.cat([
        oracle_target(yc, closed_form_score(pc, hc, yc, objective=objective), oracle=oracle, max_evals=max_evals)
        for yc, pc, hc in zip(y.split(chunk), p_s.split(chunk), h.split(chunk))]) if len(y) else y
    return line_search(y, target, epsilon=epsilon)


def jacobian_last_layer(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(K, D): row k = d(-log softmax_k(model(x)))/d(last Linear weight), flattened; ``x`` is one row (1, C, H, W).

    As the reference's ``compute_jacobian_nll``: one forward, then one ``autograd.grad`` per class on the last
    weight only (``retain_graph``), so each backward stops at that layer.
    """
    w = last_linear(model).weight
    with torch.inference_mode(False), torch.enable_grad():
        nlls = -torch.log_softmax(model(x.clone()), dim=1)[0]
        rows = [torch.autograd.grad(nlls[k], w, retain_graph=True)[0].flatten() for k in range(nlls.shape[0])]
    return torch.stack(rows).double()


def _jacobian_score(g: torch.Tensor, y: torch.Tensor, *, objective: str) -> Score:
    """One row's objective on ``G^T v`` with the explicit Jacobian ``g`` (K, D); candidates (M, K) or (1, M, K)."""
    gy = y @ g  # (1, D)

    def score(c: torch.Tensor) -> torch.Tensor:
        gc = torch.matmul(c, g).reshape(1, -1, g.shape[1])  # (1, M, D)
        if objective == "angular":
            return (_unit(gc) - _unit(gy)[:, None]).pow(2).sum(dim=-1)
        return (gc - gy[:, None]).pow(2).sum(dim=-1)

    return score


def _candidate_loop(gt: np.ndarray, y: np.ndarray, cands: np.ndarray, *, objective: str) -> np.ndarray:
    """(M,) objective values, one candidate at a time as the reference's oracles (``calc_objective_numpy`` /
    ``calc_surrogate_objective_numpy``): ``gt`` (D, K) = G^T, ``y`` (K,), ``cands`` (M, K)."""
    v = gt @ y
    if objective == "angular":
        v = v / max(float(np.linalg.norm(v)), 1e-12)
    out = np.empty(len(cands))
    for i, c in enumerate(cands):
        u = gt @ c
        if objective == "angular":
            u = u / max(float(np.linalg.norm(u)), 1e-12)
        d = u - v
        out[i] = d @ d
    return out


def reference_target(g: torch.Tensor, y: torch.Tensor, *, oracle: str, objective: str,
                     max_evals: int = 1024) -> torch.Tensor:
    """The target ``y*`` (1, K) of one row from its explicit Jacobian ``g`` (K, D) float64 and answer ``y`` (1, K).

    As the reference's ``oracle_extreme`` / ``oracle_argmax_preserving``: a loop over the candidates, ``G^T`` times
    each. K > 10 ``argmax``: the greedy search, each round's candidates in one product (as the reference's
    ``oracle_argmax_preserving_approx_gpu``). Ties: the first candidate within rounding (:func:`first_best`).
    """
    k = y.shape[1]
    if oracle == "argmax" and k > ENUM_MAX_K:
        return _greedy_target(y, _jacobian_score(g, y, objective=objective), max_evals=max_evals)
    if oracle == "extreme":
        perm, cands = None, torch.eye(k, dtype=torch.float64)
        gt, yv = g.T.numpy(), y[0].numpy()
    else:  # candidates in top-first coordinates: permute G's rows and y alike (G^T y is unchanged)
        perm, cands = top_first(y), argmax_candidates(k)
        gt, yv = g[perm[0]].T.numpy(), y[0, perm[0]].numpy()
    scores = torch.from_numpy(_candidate_loop(np.ascontiguousarray(gt), yv, cands.numpy(), objective=objective))
    chosen = cands[first_best(scores[None])]  # (1, K)
    return chosen if perm is None else torch.zeros_like(y).scatter(1, perm, chosen)


def mad_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epsilon: float, oracle: str,
                  objective: str, max_evals: int = 1024) -> torch.Tensor:
    """The slow reference, one example at a time as the reference code: the explicit autograd Jacobian ``G`` (K, D)
    (:func:`jacobian_last_layer`), the oracle's loop over candidates on ``G^T v`` (:func:`reference_target`), the
    line search.

    Shapes: x (N, C, H, W), y (N, K) -> (N, K) float64. Used by the tests and the benchmark only.
    """
    out = []
    for i in range(len(x)):
        g = jacobian_last_layer(model, x[i : i + 1]).cpu()  # (K, D)
        yi = as_simplex(y[i : i + 1]).cpu()
        target = reference_target(g, yi, oracle=oracle, objective=objective, max_evals=max_evals)
        out.append(line_search(yi, target, epsilon=epsilon))
    return torch.cat(out).to(y.device)


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
        self.surrogate, self.surrogate_name = prepare_surrogate(surrogate), surrogate_name
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
            p_s, h = surrogate_features(self.surrogate, x, chunk=CPU_CHUNK if x.device.type == "cpu" else None)
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
