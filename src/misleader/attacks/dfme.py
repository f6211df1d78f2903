"""DFME: data-free model extraction with a generator and zeroth-order gradients.

Truong et al., "Data-Free Model Extraction", CVPR 2021, https://arxiv.org/abs/2011.14779
(reference code: ``cake-lab/datafree-model-extraction``, ``dfme/train.py`` and
``dfme/approximate_gradients.py``; notes in ``shared/research/attacks.md`` section 1).

A generator (:class:`~misleader.models.generators.GeneratorA`) synthesises queries; the clone is
trained to match the victim on them, and the generator is trained to make them *disagree*. The
victim is a black box, so the generator's gradient is estimated by forward differences on the
pre-tanh image. One iteration:

1. ``g_iter`` generator steps: ``x = G(z)`` before tanh; :func:`estimate_gradient` of the per-sample
   loss ``-mean_k |clone(x)_k - t(x)_k|`` (clone in eval mode, ``t`` the victim's recovered logits)
   at ``x`` and at ``m`` points ``x + epsilon * u`` (``u`` uniform on the unit sphere); all ``m + 1``
   probes of a batch go to the oracle in one call; ``x.backward(g)``; Adam step on G.
2. ``d_iter`` clone steps, each on a fresh detached ``G(z)``: one query per image, L1 between the
   clone's logits and the recovered victim logits (``F.l1_loss``), SGD step.

so one iteration costs ``batch_size * (g_iter * (m + 1) + d_iter)`` queries (1,792 with the paper's
settings). The budget buys ``budget // cost`` iterations; whatever is left (less than one
iteration) is not used. Learning rates of both models drop by ``gamma`` at the ``milestones``
fractions of the iterations.

Logit recovery from a probability API (``logit_recovery``): ``"log"`` (default, DESIGN.md rule 4)
takes ``log(max(p, floor_row)) - rowmean``, which equals the victim's logits up to a per-row constant
wherever ``p > 0``. The floor matters against defenses that return exact zeros (rounding, top-k,
label-like outputs): with a fixed floor at the smallest float32 number (the previous choice) every
zero became a ``log(1.2e-38) = -87`` logit, an outlier that dominates both the clone's L1 target and
the row mean that centres it. Here each row's floor is
``min(smallest positive entry of the row, FLOOR_RATIO * top-1 of the row)``, ``FLOOR_RATIO = 1e-6``:

* it never raises a positive entry (the floor is at most the smallest one), so an undefended oracle,
  whose float32 softmax underflows to zero only beyond ~100-nat gaps, keeps every positive entry exact;
* a zero becomes a stand-in at most ``ln(1e6) = 13.8`` nats below the row's top-1, i.e. "below the
  API's resolution", a finite bound of the order of a confident victim's logit gaps instead of 87;
* a one-hot row (top-1 rounding) keeps its argmax: the smallest positive entry alone would lift
  the zeros to the top-1 and flatten the row, which is why the ``min`` with the ratio is taken
  rather than a ``max``.

``"authors_log_softmax"`` is the MISLEADER authors' variant (log_softmax applied to the
probabilities, i.e. ``p - mean(p)``), kept only to compare with their numbers: it squashes both the
clone's target and the zeroth-order signal (``shared/research/misleader-code.md`` section 6).

Image space: the generator's tanh image ``x`` in [-1, 1] becomes the query
``clamp(image_center + image_scale * x, 0, 1)``; the defaults (0.5, 0.5) give ``(x + 1) / 2``, the
whole [0, 1] range. The reference instead fed ``x`` to a victim that normalises its input, i.e. it
generated in the victim's *normalised* space; setting ``image_center``/``image_scale`` to the
victim's normalisation mean/std reproduces exactly that (knowledge the reference assumed and a
black-box attacker may or may not have, e.g. public dataset statistics). This matters: the final
``BatchNorm(affine=False)`` of GeneratorA centres the pre-tanh image, so with ``(x + 1) / 2`` every
generated batch averages mid-grey, far from MNIST's black background. Measured with the ``cpu``
preset at 500k queries against the MNIST LeNet5 victim (99.1%): 74.2% clone accuracy with
``(x + 1) / 2``, 96.3% with ``image_center=0.1, image_scale=0.275`` (the victim's normalisation).

Presets (:data:`PRESETS`): ``paper`` (the reference defaults), ``cpu`` (batch 128, ngf 32, generator
lr 5e-4, milestones 50%/80%: the CPU-scale MNIST setting) and ``misleader-authors`` (the MISLEADER
repository's DFME: batch 2048, generator lr 1e-5, log_softmax on probabilities).

Deviations from the reference code:
    * The generator's tanh image is mapped to [0, 1] by ``(x + 1) / 2`` before querying (default):
      our oracles and models take [0, 1] images and normalise inside. The reference fed the [-1, 1]
      image straight to a model that expects normalised input; ``image_center``/``image_scale``
      reproduce that when set to the victim's normalisation (see "Image space" above).
    * Image size and channels come from the oracle's ``input_shape`` (the reference hard-codes
      3x32x32).
    * Learning-rate milestones are fractions of the *iterations* and take effect exactly there;
      the reference schedules per epoch of 50 iterations and steps its scheduler before each epoch
      (old PyTorch order), so each drop came one epoch early.
    * All ``N * (m + 1)`` probe points are answered by one batched oracle call. The reference
      evaluates them in ``N * m // 4992 + 1`` chunks of 4,992 (counting only ``N * m`` points), so
      some probes are never evaluated (and the reshape fails) once ``N * (m + 1)`` exceeds them.
    * Random directions, latent codes and weight initialisation come from the ``torch.Generator``
      given to :meth:`DFME.run` (the reference uses unseeded ``np.random`` and a random seed).
    * No white-box diagnostics: the reference's ``--rec_grad_norm`` (on by default) back-propagates
      through the victim once per epoch; a black-box attack cannot, so it is gone.
    * No test-set model selection: the clone returned is the final one (the reference reports the
      best test accuracy over epochs). The harness reports "best" separately, labelled as such.
    * A probability API is the default target, so logits are recovered from ``p`` (the reference
      attacked a logit API and applied log_softmax to the logits, which is the same computation).
    * The gradient estimate keeps the reference's scale ``dim / (num_classes * N)`` (the
      ``1 / num_classes`` is a redundant rescaling that Adam absorbs); its probes are evaluated in
      float32 even when ``amp`` is on, because bf16/fp16 rounding would swamp differences of size
      ``epsilon``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from misleader.attacks.base import Attack, AttackResult, Evaluator, apply_preset, register_attack
from misleader.errors import MisleaderError
from misleader.models.generators import GeneratorA, tanh_to_unit
from misleader.oracle import Oracle
from misleader.utils import autocast, derive_seed, forked_rng

log = logging.getLogger(__name__)

LogitRecovery = Literal["log", "authors_log_softmax"]
LOGIT_RECOVERIES: tuple[str, ...] = ("log", "authors_log_softmax")
#: an exact zero in a returned row stands for a probability at most this fraction of the row's top-1
#: (i.e. at most ``ln(1e6) = 13.8`` nats below it); see "Logit recovery" in the module docstring
FLOOR_RATIO = 1e-6


# --------------------------------------------------------------------------- pure pieces


def recover_logits(probs: torch.Tensor, *, method: LogitRecovery = "log",
                   floor_ratio: float = FLOOR_RATIO) -> torch.Tensor:
    """Victim logits (up to a per-row constant) from returned probabilities, rows centred to mean 0.

    Args:
        probs: (N, K) probabilities (rows on the simplex; zeros allowed).
        method: ``"log"``: ``log(max(p, floor_row)) - rowmean`` with
            ``floor_row = min(smallest positive entry of the row, floor_ratio * top-1 of the row)``
            (see "Logit recovery" in the module docstring): exact (logits minus their row mean, up to
            the constant that the zeros' stand-in shifts) wherever ``p > 0``, and an exact zero (from
            rounding or top-k) becomes a stand-in at most ``log(1 / floor_ratio)`` nats below the
            top-1, never a ``log(tiny) = -87`` outlier; ``"authors_log_softmax"``: the MISLEADER
            authors' ``log_softmax(p) - rowmean`` (= ``p - mean(p)``), for comparison only.
        floor_ratio: the zeros' stand-in relative to the row's top-1 probability (> 0, < 1).

    Returns:
        (N, K) float tensor, finite, each row summing to 0.

    Raises:
        ValueError: unknown ``method`` or ``floor_ratio`` outside (0, 1).
    """
    p = probs.float()
    if method == "log":
        if not 0.0 < floor_ratio < 1.0:
            raise ValueError(f"floor_ratio must be in (0, 1), got {floor_ratio}")
        tiny = torch.finfo(p.dtype).tiny
        smallest = p.masked_fill(p <= 0, math.inf).amin(dim=1, keepdim=True)  # inf for an all-zero row
        floor = torch.minimum(smallest, floor_ratio * p.amax(dim=1, keepdim=True)).clamp_min(tiny)
        t = torch.maximum(p, floor).log()
    elif method == "authors_log_softmax":
        t = F.log_softmax(p, dim=1)
    else:
        raise ValueError(f"logit_recovery must be one of {LOGIT_RECOVERIES}, got {method!r}")
    return t - t.mean(dim=1, keepdim=True)


def unit_directions(n: int, m: int, shape: tuple[int, ...], *, generator: torch.Generator,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """``m`` directions per sample, uniform on the unit sphere of R^d (d = prod(shape)).

    Shape: -> (n, m, *shape); every (i, j) slice has Euclidean norm 1. Drawn on the generator's
    device (normal samples normalised, "method 3" of the reference), then moved to ``device``.
    """
    d = math.prod(shape)
    u = torch.randn(n, m, d, generator=generator, device=generator.device)
    u = u / u.norm(dim=2, keepdim=True)
    return u.view(n, m, *shape).to(device if device is not None else generator.device)


@torch.no_grad()
def estimate_gradient(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    x_pre: torch.Tensor,
    *,
    m: int,
    epsilon: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-difference zeroth-order estimate of each sample's loss gradient (DFME, Alg. 1).

    For sample ``i`` with ``m`` unit directions ``u_ij``:
    ``g_i = d / epsilon * mean_j (l_i(x_i + epsilon u_ij) - l_i(x_i)) u_ij`` with ``d`` the number of
    elements of one sample. ``E[d u u^T] = I``, so ``g_i`` tends to ``grad l_i(x_i)`` (unbiased in
    the limit ``epsilon -> 0``; its cosine with the true gradient is positive on average for any
    ``m`` and grows with ``m``).

    Args:
        loss_fn: maps a batch of points (P, *x_pre.shape[1:]) to per-point losses (P,). It is called
            once, with ``P = N * (m + 1)`` points ordered sample-major: for sample ``i``, the ``m``
            perturbed points then the unperturbed one.
        x_pre: (N, ...) the points where the gradient is wanted (DFME: the pre-tanh images).
        m: number of random directions per sample (>= 1).
        epsilon: step size (> 0).
        generator: source of the random directions.

    Returns:
        ``(grad, loss)``: (N, ...) gradient estimates (same dtype and device as ``x_pre``) and the
        (N,) losses at ``x_pre``.

    Raises:
        ValueError: ``m < 1``, ``epsilon <= 0`` or ``loss_fn`` returns the wrong shape.
    """
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    x = x_pre.detach().float()
    n, shape = x.shape[0], tuple(x.shape[1:])
    u = unit_directions(n, m, shape, generator=generator, device=x.device)  # (N, m, *shape)
    u = torch.cat([u, torch.zeros_like(u[:, :1])], dim=1)  # (N, m + 1, *shape); last = no move
    points = (x.unsqueeze(1) + epsilon * u).reshape(n * (m + 1), *shape)
    losses = loss_fn(points)
    if losses.shape != (n * (m + 1),):
        raise ValueError(f"loss_fn must return ({n * (m + 1)},) losses, got {tuple(losses.shape)}")
    losses = losses.float().view(n, m + 1)
    diff = (losses[:, :m] - losses[:, m:]).view(n, m, *([1] * len(shape)))
    d = math.prod(shape)
    grad = (d / epsilon) * (diff * u[:, :m]).mean(dim=1)
    return grad.to(x_pre.dtype), losses[:, m]


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DFMEConfig:
    """DFME hyper-parameters; the defaults are the paper's (``run_cifar_dfme.sh``)."""

    batch_size: int = 256
    nz: int = 256
    ngf: int = 64
    grad_m: int = 1
    grad_epsilon: float = 1e-3
    g_iter: int = 1
    d_iter: int = 5
    lr_clone: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_generator: float = 1e-4
    milestones: tuple[float, ...] = (0.1, 0.3, 0.5)
    gamma: float = 0.3
    logit_recovery: str = "log"
    image_center: float = 0.5
    image_scale: float = 0.5
    amp: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "nz", "ngf", "grad_m", "g_iter"):
            if getattr(self, name) < 1:
                raise MisleaderError(f"dfme option {name} must be >= 1, got {getattr(self, name)}")
        if self.d_iter < 0:
            raise MisleaderError(f"dfme option d_iter must be >= 0, got {self.d_iter}")
        if not self.grad_epsilon > 0:
            raise MisleaderError(f"dfme option grad_epsilon must be > 0, got {self.grad_epsilon}")
        if any(not 0 <= f <= 1 for f in self.milestones):
            raise MisleaderError(
                f"dfme milestones are fractions of the iterations in [0, 1], got {self.milestones}")
        if not self.image_scale > 0:
            raise MisleaderError(f"dfme option image_scale must be > 0, got {self.image_scale}")
        if self.logit_recovery not in LOGIT_RECOVERIES:
            raise MisleaderError(
                f"dfme option logit_recovery must be one of {', '.join(LOGIT_RECOVERIES)}, "
                f"got {self.logit_recovery!r}"
            )

    @property
    def cost_per_iteration(self) -> int:
        """Queries per iteration: ``batch_size * (g_iter * (grad_m + 1) + d_iter)``."""
        return self.batch_size * (self.g_iter * (self.grad_m + 1) + self.d_iter)


#: Named settings. ``paper``: the reference defaults (CIFAR-10 script; 1,792 queries/iteration).
#: ``cpu``: MNIST-sized victims at CPU budgets (100k-1M queries, i.e. a few hundred iterations):
#: batch 128 and ngf 32 (896 queries/iteration), the generator lr of the original CIFAR-10 script
#: (5e-4) and the milestones of the small-budget SVHN script (50% and 80%); with the paper's 1e-4
#: and 10/30/50% the generator hardly moves in so few iterations (measured: 59.6% vs 74.2% clone
#: accuracy at 500k queries against the MNIST LeNet5 victim).
#: ``misleader-authors``: the MISLEADER repository's DFME (batch 2048, lr_G 1e-5, log_softmax on p).
PRESETS: dict[str, DFMEConfig] = {
    "paper": DFMEConfig(),
    "cpu": DFMEConfig(batch_size=128, ngf=32, lr_generator=5e-4, milestones=(0.5, 0.8)),
    "misleader-authors": DFMEConfig(batch_size=2048, lr_generator=1e-5, logit_recovery="authors_log_softmax"),
}


def _device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``generator`` (or ``generator`` itself if it lives there)."""
    if generator.device.type == device.type:
        return generator
    return torch.Generator(device=device).manual_seed(derive_seed(generator))


def _milestone_factor(step: int, total: int, milestones: tuple[float, ...], gamma: float) -> float:
    marks = [int(f * total) for f in milestones]
    return gamma ** sum(step >= mk for mk in marks)


# --------------------------------------------------------------------------- the attack


@register_attack("dfme")
class DFME(Attack):
    """Data-free model extraction against a probability oracle.

    Args:
        preset: a key of :data:`PRESETS` (``paper``, ``cpu``, ``misleader-authors``).
        **overrides: any :class:`DFMEConfig` field, replacing the preset's value (e.g.
            ``logit_recovery="authors_log_softmax"``, ``batch_size=64``).

    Raises:
        MisleaderError: unknown preset or option, or an invalid value.

    Example:
        >>> attack = DFME(preset="cpu", logit_recovery="log")
        >>> attack.cost_per_iteration
        896
    """

    requires = frozenset({"probs"})

    def __init__(self, *, preset: str = "paper", **overrides: Any) -> None:
        self._cfg = apply_preset(self, presets=PRESETS, preset=preset, overrides=overrides,
                                 casts={"milestones": float})

    @classmethod
    def tiny_options(cls) -> dict[str, Any]:
        """The smallest sensible configuration (tests, conformance, benchmarks): 28 queries/iteration."""
        return {"preset": "cpu", "batch_size": 4, "nz": 8, "ngf": 4}

    @property
    def cost_per_iteration(self) -> int:
        """Queries per iteration: ``batch_size * (g_iter * (grad_m + 1) + d_iter)``."""
        return self._cfg.cost_per_iteration

    def iterations_for(self, budget: int) -> int:
        """Whole iterations a budget buys: ``budget // cost_per_iteration``."""
        return budget // self.cost_per_iteration

    def run(
        self,
        oracle: Oracle,
        *,
        budget: int,
        clone: nn.Module,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        evaluate: Evaluator | None = None,
        eval_every: int | None = None,
    ) -> AttackResult:
        """Extract ``oracle`` into ``clone`` with at most ``budget`` queries.

        Args:
            oracle: a probability oracle (``output="probs"``), images in [0, 1] of ``input_shape``.
            budget: query budget; ``budget // cost_per_iteration`` iterations are run.
            clone: classifier in [0, 1] input space returning (N, K) logits; trained in place.
            generator: seeds the generator's weights, the latent codes and the random directions.
            device: where the generator and the clone run.
            evaluate: optional harness callback (history only, never used for decisions).
            eval_every: queries between evaluations (default: about a tenth of the budget).

        Returns:
            :class:`AttackResult`; ``extra`` holds ``iterations``, ``cost_per_iteration``,
            ``unused_queries`` and the last losses.

        Raises:
            ValueError: the oracle is not a probability oracle or the budget is invalid.
            MisleaderError: the budget buys no iteration, or the input shape does not fit GeneratorA.
        """
        self.check_oracle(oracle, budget)
        cfg = self._cfg
        dev = torch.device(device)
        cost = cfg.cost_per_iteration
        iterations = budget // cost
        if iterations < 1:
            raise MisleaderError(
                f"dfme needs at least {cost} queries for one iteration (batch {cfg.batch_size} x "
                f"(g_iter {cfg.g_iter} x (m {cfg.grad_m} + 1) + d_iter {cfg.d_iter})), "
                f"got a budget of {budget}: "
                "raise --budget or lower batch_size"
            )
        c, h, w = oracle.input_shape
        if h != w or h % 4 != 0:
            raise MisleaderError(f"dfme's GeneratorA makes square images with a side divisible by 4; "
                                 f"the oracle takes {c}x{h}x{w}")
        t0 = time.perf_counter()
        start_used = oracle.queries_used
        gen_dev = _device_generator(generator, dev)
        with forked_rng(generator, dev):
            netg = GeneratorA(nz=cfg.nz, ngf=cfg.ngf, img_size=h, nc=c)
        # channels_last: oneDNN (CPU) and tensor-core convolutions avoid a layout copy per layer (2x on CPU)
        netg = netg.to(dev, memory_format=torch.channels_last)
        clone.to(dev).train()
        opt_c = torch.optim.SGD(clone.parameters(), lr=cfg.lr_clone, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
        opt_g = torch.optim.Adam(netg.parameters(), lr=cfg.lr_generator)
        lam = lambda s: _milestone_factor(s, iterations, cfg.milestones, cfg.gamma)  # noqa: E731
        sched_c = torch.optim.lr_scheduler.LambdaLR(opt_c, lam)
        sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lam)
        k = oracle.num_classes
        spent = 0

        def query_logits(x_unit: torch.Tensor) -> torch.Tensor:
            nonlocal spent
            probs = oracle.query(x_unit)
            spent += int(x_unit.shape[0])
            return recover_logits(probs.to(dev), method=cfg.logit_recovery)  # type: ignore[arg-type]

        def to_image(x_tanh: torch.Tensor) -> torch.Tensor:
            """[-1, 1] -> [0, 1]: ``clamp(center + scale * x)`` (``(x + 1) / 2`` by default)."""
            if cfg.image_center == 0.5 and cfg.image_scale == 0.5:
                return tanh_to_unit(x_tanh).clamp_(0.0, 1.0)
            return (cfg.image_center + cfg.image_scale * x_tanh).clamp_(0.0, 1.0)

        def probe_loss(points_pre: torch.Tensor) -> torch.Tensor:
            """-mean_k |clone - t| per point; clone in eval mode, float32 (see module doc)."""
            x_unit = to_image(torch.tanh(points_pre))
            target = query_logits(x_unit)
            out = clone(x_unit).float()
            return -(out - target).abs().mean(dim=1)

        def sample_z() -> torch.Tensor:
            return torch.randn(cfg.batch_size, cfg.nz, generator=gen_dev, device=gen_dev.device).to(dev)

        if eval_every is None:
            eval_every = max(cost, budget // 10)
        history: list[dict[str, Any]] = []
        next_eval = eval_every
        loss_c = loss_g = float("nan")
        for it in range(iterations):
            # (1) generator: zeroth-order estimate of d(-L1)/dx on the pre-tanh image
            netg.train()
            clone.eval()
            for _ in range(cfg.g_iter):
                opt_g.zero_grad(set_to_none=True)
                with autocast(dev, cfg.amp):
                    x_pre = netg(sample_z(), pre_x=True)
                x_pre = x_pre.float()
                grad, loss_at_x = estimate_gradient(probe_loss, x_pre, m=cfg.grad_m, epsilon=cfg.grad_epsilon,
                                                    generator=gen_dev)
                # the reference's scale: mean over the batch and a redundant 1 / num_classes
                x_pre.backward(grad / (k * cfg.batch_size))
                opt_g.step()
                loss_g = float(loss_at_x.mean())
            # (2) clone: L1 to the recovered victim logits on fresh generated images
            clone.train()
            for _ in range(cfg.d_iter):
                with torch.no_grad(), autocast(dev, cfg.amp):
                    x_unit = to_image(netg(sample_z()).float())
                target = query_logits(x_unit)
                with autocast(dev, cfg.amp):
                    out = clone(x_unit)
                loss = F.l1_loss(out.float(), target)
                opt_c.zero_grad(set_to_none=True)
                loss.backward()
                opt_c.step()
                loss_c = float(loss.detach())
            if cfg.d_iter > 0:
                sched_c.step()
            sched_g.step()
            if evaluate is not None and (spent >= next_eval or it == iterations - 1):
                row = {"iteration": it + 1, "loss_clone": loss_c, "loss_generator": loss_g}
                evaluate(clone, queries=spent, **row)
                log.debug("dfme %d/%d queries: %s", spent, budget, row)
                while next_eval <= spent:
                    next_eval += eval_every
                clone.train()
        clone.eval()
        used = oracle.queries_used - start_used
        if used != spent or spent != iterations * cost:
            raise RuntimeError(f"dfme accounting mismatch: oracle counted {used}, attack {spent}, "
                               f"expected {iterations * cost}")
        seconds = time.perf_counter() - t0
        log.info("dfme: %d iterations, %d queries (%d unused) in %.1fs", iterations, spent, budget - spent,
                 seconds)
        return AttackResult(
            clone=clone, queries_used=spent, history=history, seconds=seconds,
            extra={"iterations": iterations, "cost_per_iteration": cost, "unused_queries": budget - spent,
                   "loss_clone": loss_c, "loss_generator": loss_g, "preset": self.preset},
        )
