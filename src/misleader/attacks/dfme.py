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

Image space (``image_space``): the generator's tanh image ``x`` in [-1, 1] becomes the query
``clamp(center + scale * x, 0, 1)`` per channel. The default, ``"dataset"``, takes ``center, scale``
= the public normalisation mean and std of the dataset the target declares (:data:`PUBLIC_STATS`;
e.g. MNIST 0.1307/0.3081), which is what the reference implicitly did: it fed ``x`` to a victim that
normalises its input, i.e. it generated in the victim's normalised space. The statistics are attacker
knowledge (published for every standard dataset; the attacker learns only the dataset's *name*, through
:meth:`DFME.adapt_to_target`). ``"unit"`` gives ``(x + 1) / 2``, the whole [0, 1] range, and
``image_center``/``image_scale`` set the map by hand. This matters: the final ``BatchNorm(affine=False)``
of GeneratorA centres the pre-tanh image, so with ``(x + 1) / 2`` every generated batch averages
mid-grey, far from MNIST's black background (issue 10 measured 74.2% vs 96.3% clone accuracy at 500k
queries; the default follows the reference and DESIGN.md rule 6, not that measurement).

Presets (:data:`PRESETS`; ``preset="auto"``, the default, picks by the target's input shape):
``paper`` (the reference defaults), ``small`` = ``cpu`` (MNIST-sized targets; its values and how they
were chosen are next to :data:`PRESETS`) and ``misleader-authors`` (the MISLEADER repository's DFME:
batch 2048, generator lr 1e-5, log_softmax on probabilities).

Throughput: one oracle call per iteration. The clone's ``d_iter`` fresh batches of an iteration and the
*next* iteration's probe points are made by the same generator weights (the generator changes only in
its own step), so they are generated, then answered together; the clone is evaluated at the probes
only when the next iteration starts, after its own steps, as in the reference. Losses stay on the
device (no host synchronisation per step); the attacker's held-out agreement is counted there too.
The generator runs channels-last with ``GeneratorA(fast_upsample=True)`` (each "upsample x2, conv3" as four
2x2 convolutions of the low-resolution input: the same function with 16/36 of the multiply-adds; its float
rounding differs from the plain order by ~1e-6, so runs are not bit-identical to the plain order's, but the
same seed still gives the same run).

Precision on CPU (``cpu_bf16``): ``None`` (the default, "auto") runs the *generator's* forwards (and so its
backward) under bfloat16 autocast when the CPU has native bfloat16 arithmetic (AMX or AVX512-BF16:
``torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()``); the generator is 39x a
LeNet5 clone's arithmetic per image, so that is most of the attack's time. The clone learns in float32 and is
evaluated at the probe points in float32 (differences of size ``epsilon``); its weights, the generator's
weights and optimiser state stay float32. ``True`` / ``False`` force it. On a CPU without those instructions
bf16 would be slower, so "auto" leaves it off there; the run's ``extra["cpu_bf16"]`` records what was used.
bf16 rounding changes the numbers: the same seed gives the same run on the same kind of CPU, not across kinds.
Measured (MNIST LeNet5 victim, default preset, seed 0, idle 2-core Xeon with AMX, ``misleader attack dfme
--target V --budget 2000000 --clone-arch lenet5``): float32 95.76 % in 763 s; bf16 for the generator *and*
the clone's training forwards (the first version of this option) 96.31 % in 389 s
(``bench/results/attacks_dfme_2m_*.json``). At 500k, 1 thread on a loaded machine: float32 92.09 %, that
bf16-everywhere version 89.10 % (one seed each). Not knowing whether those 3 points were seed noise, the
default keeps the clone in float32; see ``bench/results/attacks_dfme_precision.json`` for this version's runs.

Arithmetic per query (``python bench/dfme_flops.py --target V``, FLOPs of convolutions and matrix products):
the default preset spends 39.2 MFLOP per paid query (the ngf-32 generator alone is 32.2 MFLOP per image,
39x a LeNet5 forward) against 0.83 MFLOP per answered oracle row, so at equal FLOP rates DFME could reach at
most 2.1 % of the oracle's rows/s; it reaches 4.3 % in float32 and 9.7 % in bfloat16 (2 threads, idle,
``bench/results/attacks_dfme_ratio_idle.json``), because the generator's large convolutions run at a higher
FLOP rate than LeNet5's small ones. The ``small-fast`` preset (ngf 8: 5.5 MFLOP per query, ceiling 15.2 %)
reaches 11.5 %.

Deviations from the reference code:
    * Our oracles and models take [0, 1] images and normalise inside, so the generator's tanh image
      is mapped to [0, 1] with the dataset's public statistics (see "Image space" above); the
      reference fed the [-1, 1] image straight to a model that normalises with those statistics.
    * Image size and channels come from the oracle's ``input_shape`` (the reference hard-codes
      3x32x32).
    * Learning-rate milestones are fractions of the *iterations* and take effect exactly there;
      the reference schedules per epoch of 50 iterations and steps its scheduler before each epoch
      (old PyTorch order), so each drop came one epoch early.
    * All ``N * (m + 1)`` probe points are answered by one batched oracle call, shared with the
      previous iteration's clone batches (see "Throughput"). The reference evaluates them in
      ``N * m // 4992 + 1`` chunks of 4,992 (counting only ``N * m`` points), so some probes are
      never evaluated (and the reshape fails) once ``N * (m + 1)`` exceeds them.
    * Zeros in the returned probabilities get a per-row floor before the log (see "Logit recovery").
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

from misleader.attacks.accounting import QueryLedger, device_generator
from misleader.attacks.base import Attack, AttackResult, Evaluator, check_range, register_attack
from misleader.errors import MisleaderError
from misleader.models.generators import GeneratorA
from misleader.oracle import Oracle
from misleader.utils import autocast, forked_rng

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
def probe_points(x_pre: torch.Tensor, *, m: int, epsilon: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m + 1`` probe points of each sample (first half of :func:`estimate_gradient`).

    Args:
        x_pre: (N, ...) the points where the gradient is wanted.
        m: random directions per sample (>= 1).
        epsilon: step size (> 0).
        generator: source of the random directions.

    Returns:
        ``(points, u)``: (N * (m + 1), ...) float32 points ordered sample-major (for sample ``i`` the
        ``m`` perturbed points ``x_i + epsilon u_ij``, then ``x_i``) and the (N, m, ...) directions.

    Raises:
        ValueError: ``m < 1`` or ``epsilon <= 0``.
    """
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    x = x_pre.detach().float()
    n, shape = x.shape[0], tuple(x.shape[1:])
    u = unit_directions(n, m, shape, generator=generator, device=x.device)  # (N, m, *shape)
    points = torch.cat([x.unsqueeze(1) + epsilon * u, x.unsqueeze(1)], dim=1)  # last = no move
    return points.reshape(n * (m + 1), *shape), u


@torch.no_grad()
def combine_probes(losses: torch.Tensor, u: torch.Tensor, *, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-difference gradient from the probe losses (second half of :func:`estimate_gradient`).

    Args:
        losses: (N * (m + 1),) losses at :func:`probe_points`' points, in their order.
        u: (N, m, ...) the directions :func:`probe_points` returned.
        epsilon: the step size used.

    Returns:
        ``(grad, loss)``: (N, ...) float32 gradient estimates and the (N,) losses at the unperturbed points.

    Raises:
        ValueError: ``losses`` has the wrong shape.
    """
    n, m, shape = u.shape[0], u.shape[1], tuple(u.shape[2:])
    if losses.shape != (n * (m + 1),):
        raise ValueError(f"loss_fn must return ({n * (m + 1)},) losses, got {tuple(losses.shape)}")
    losses = losses.float().view(n, m + 1)
    diff = (losses[:, :m] - losses[:, m:]).view(n, m, *([1] * len(shape)))
    grad = (math.prod(shape) / epsilon) * (diff * u).mean(dim=1)
    return grad, losses[:, m]


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
    ``m`` and grows with ``m``). :func:`probe_points` then :func:`combine_probes` (the attack calls the
    two halves separately so that the probes share one oracle call with the clone's queries).

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
    points, u = probe_points(x_pre, m=m, epsilon=epsilon, generator=generator)
    grad, loss = combine_probes(loss_fn(points), u, epsilon=epsilon)
    return grad.to(x_pre.dtype), loss


# --------------------------------------------------------------------------- configuration


#: Public normalisation statistics (per-channel mean, std of the training images in [0, 1]) that an
#: attacker knows for a target that declares its dataset (the values every tutorial uses). ``digits``
#: (scikit-learn's 8x8 digits, upscaled to 32x32 by :mod:`misleader.data.datasets`) has no published
#: values: computed once from its train split with
#: ``python -c "from misleader.data.datasets import digits; x = digits().x_train.float() / 255; print(x.mean(), x.std())"``.
#: MNIST and Fashion-MNIST images are padded to 32x32 here, which lowers their mean/std slightly
#: (MNIST: 0.100/0.275 in the padded frame); the attacker uses the published 28x28 values.
PUBLIC_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "digits": ((0.3056,), (0.3237,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
IMAGE_SPACES: tuple[str, ...] = ("dataset", "unit")


@dataclass(frozen=True)
class DFMEConfig:
    """DFME hyper-parameters; the defaults are the paper's (``run_cifar_dfme.sh``).

    ``image_space``: ``"dataset"`` maps the generator's tanh image to ``mean + std * x`` with the
    target dataset's public statistics (:data:`PUBLIC_STATS`; the reference's implicit choice),
    ``"unit"`` to ``(x + 1) / 2``. ``image_center`` / ``image_scale`` (one value or one per channel)
    override either.
    """

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
    image_space: str = "dataset"
    image_center: tuple[float, ...] | None = None
    image_scale: tuple[float, ...] | None = None
    amp: bool = True
    #: bfloat16 autocast on CPU (the generator's forwards and the clone's training forwards; the clone at the
    #: probe points stays float32, as with ``amp`` on CUDA): ``None`` = auto, on where the CPU has AMX or
    #: AVX512-BF16 (:func:`cpu_has_bf16`); ``True``/``False`` force it. See "Precision on CPU" above
    cpu_bf16: bool | None = None
    #: ``True``: each iteration's clone batches and the next iteration's probes share one oracle call (same
    #: queries, fewer calls); ``False``: one call per clone batch, asked while the clone is in train mode and
    #: trained on the very tensor asked (what adaptive variants that edit clone batches hook into)
    fuse: bool = True

    def __post_init__(self) -> None:
        check_range("dfme", self, positive=("batch_size", "nz", "ngf", "grad_m", "g_iter", "grad_epsilon",
                                            "lr_clone", "lr_generator", "gamma"),
                    non_negative=("d_iter", "momentum", "weight_decay"))
        if any(not 0 <= f <= 1 for f in self.milestones):
            raise MisleaderError(
                f"dfme milestones are fractions of the iterations in [0, 1], got {self.milestones}")
        if self.image_scale is not None and (not self.image_scale or any(not v > 0 for v in self.image_scale)):
            raise MisleaderError(f"dfme option image_scale must be > 0, got {self.image_scale}")
        if self.image_center is not None and not self.image_center:
            raise MisleaderError("dfme option image_center needs at least one value")
        if self.image_space not in IMAGE_SPACES:
            raise MisleaderError(f"dfme option image_space must be one of {', '.join(IMAGE_SPACES)}, "
                                 f"got {self.image_space!r}")
        if self.logit_recovery not in LOGIT_RECOVERIES:
            raise MisleaderError(
                f"dfme option logit_recovery must be one of {', '.join(LOGIT_RECOVERIES)}, "
                f"got {self.logit_recovery!r}"
            )

    @property
    def cost_per_iteration(self) -> int:
        """Queries per iteration: ``batch_size * (g_iter * (grad_m + 1) + d_iter)``."""
        return self.batch_size * (self.g_iter * (self.grad_m + 1) + self.d_iter)


#: Named settings; ``preset="auto"`` (the default) picks ``small`` for 1-channel targets of at most 32x32
#: pixels (MNIST, Fashion-MNIST, digits) and ``paper`` otherwise (:meth:`DFME.choose_preset`).
#:
#: * ``paper``: the reference defaults (CIFAR-10 script; 1,792 queries/iteration).
#: * ``small`` (alias ``cpu``): MNIST-sized targets at 100k-2M queries. Batch 128 is the research notes'
#:   CPU-scale batch (896 queries/iteration); lr_G 5e-4 and milestones 50%/80% and the generator width were
#:   chosen on the attacker's own paid queries, never the test set: each candidate ran against the MNIST
#:   LeNet5 victim (seed 0, LeNet5 clone) and its clone was scored by top-1 agreement with the victim on the
#:   *other* candidates' last paid batches (``python bench/select_dfme_preset.py --target V --budget B``).
#:   At B = 100k (bench/results/attacks_dfme_preset_selection.json): ngf 8 0.596, ngf 16 0.441, ngf 8 with
#:   the paper's lr_G 1e-4 0.522, with the paper's milestones 10/30/50% 0.256 (ngf 32 not run). At
#:   B = 500k, the budget the defaults are judged at (bench/results/attacks_dfme_preset_selection_500k.json,
#:   ``--only ngf8-lr5e-4,ngf16-lr5e-4,ngf32-lr5e-4 --threads 2``, load ~2): ngf 8 0.734, ngf 16 0.727,
#:   **ngf 32 0.853** -> ngf 32 (the reference's width), at 2.9x the cost per query of ngf 8.
#: * ``small-fast``: ``small`` with ngf 8 (the 100k winner): about 3x the queries/s, a weaker clone at 500k.
#: * ``misleader-authors``: the MISLEADER repository's DFME (batch 2048, lr_G 1e-5, log_softmax on p).
PRESETS: dict[str, DFMEConfig] = {
    "paper": DFMEConfig(),
    "small": DFMEConfig(batch_size=128, ngf=32, lr_generator=5e-4, milestones=(0.5, 0.8)),
    "small-fast": DFMEConfig(batch_size=128, ngf=8, lr_generator=5e-4, milestones=(0.5, 0.8)),
    "misleader-authors": DFMEConfig(batch_size=2048, lr_generator=1e-5, logit_recovery="authors_log_softmax"),
}
PRESETS["cpu"] = PRESETS["small"]


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AMX tiles or AVX512-BF16), where autocast pays off."""
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):  # an older or newer torch without these probes: stay in float32
        return False


def _milestone_factor(step: int, total: int, milestones: tuple[float, ...], gamma: float) -> float:
    marks = [int(f * total) for f in milestones]
    return gamma ** sum(step >= mk for mk in marks)


def image_affine(cfg: DFMEConfig, *, dataset: str | None, channels: int) -> tuple[list[float], list[float], str]:
    """``(center, scale, how)`` of the map ``clamp(center + scale * x, 0, 1)`` from tanh images to queries.

    Per channel (length ``channels``). ``how`` says where the values came from (for the run record).
    """
    how = "unit"
    center, scale = (0.5,), (0.5,)
    if cfg.image_space == "dataset":
        stats = PUBLIC_STATS.get(dataset or "")
        if stats is not None and len(stats[0]) in (1, channels):
            center, scale, how = stats[0], stats[1], f"public statistics of {dataset}"
        else:  # a target that declares no (known) dataset: warn unless nothing was declared at all
            log.log(logging.INFO if dataset is None else logging.WARNING,
                    "dfme: no public normalisation statistics for dataset %r (%d channels); generating in "
                    "(x + 1) / 2 (pass image_center / image_scale to set them)", dataset, channels)
    if cfg.image_center is not None:
        center, how = cfg.image_center, "image_center/image_scale options"
    if cfg.image_scale is not None:
        scale, how = cfg.image_scale, "image_center/image_scale options"
    out = []
    for name, vals in (("image_center", center), ("image_scale", scale)):
        if len(vals) not in (1, channels):
            raise MisleaderError(f"dfme option {name} needs 1 or {channels} values, got {len(vals)}")
        out.append([float(v) for v in vals] * (channels if len(vals) == 1 else 1))
    return out[0], out[1], how


# --------------------------------------------------------------------------- the attack


@register_attack("dfme")
class DFME(Attack):
    """Data-free model extraction against a probability oracle.

    Args:
        preset: ``"auto"`` (default: the preset for the target's scale, see :meth:`choose_preset`) or a
            key of :data:`PRESETS` (``paper``, ``small``/``cpu``, ``misleader-authors``).
        **overrides: any :class:`DFMEConfig` field, replacing the preset's value (e.g.
            ``logit_recovery="authors_log_softmax"``, ``batch_size=64``); type-checked.

    Raises:
        MisleaderError: unknown preset or option, or an invalid value.

    Example:
        >>> attack = DFME(preset="cpu", logit_recovery="log")
        >>> attack.cost_per_iteration
        896
    """

    requires = frozenset({"probs"})
    presets = PRESETS
    scale_presets = ("small", "paper")  # 1-channel <= 32x32 targets: small
    option_casts = {"milestones": float}

    def __init__(self, *, preset: str = "auto", **overrides: Any) -> None:
        self._configure(preset, overrides)

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
            ``unused_queries``, the last losses, the image map and ``heldout_agreement`` (the clone's
            top-1 agreement with the victim on the last tenth of its clone batches, each measured
            before the clone trained on it: the attacker's own held-out score, never the test set).

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
        center, scale, image_how = image_affine(cfg, dataset=getattr(self, "_target", {}).get("dataset"),
                                                channels=c)
        t0 = time.perf_counter()
        ledger = QueryLedger(oracle, attack="dfme", device=dev)
        gen_dev = device_generator(generator, dev)
        with forked_rng(generator, dev):
            netg = GeneratorA(nz=cfg.nz, ngf=cfg.ngf, img_size=h, nc=c, fast_upsample=True)
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
        center_t = torch.tensor(center, device=dev).view(1, c, 1, 1)
        scale_t = torch.tensor(scale, device=dev).view(1, c, 1, 1)

        use_bf16 = dev.type == "cpu" and (cpu_has_bf16() if cfg.cpu_bf16 is None else cfg.cpu_bf16)

        def mixed(*, generator: bool = False) -> Any:
            """The mixed-precision context of the generator's forwards (``generator=True``: bf16 on a CPU with
            ``use_bf16``) and of the clone's training forwards (AMP on CUDA only: on CPU the clone learns in float32)."""
            if generator and use_bf16:
                return torch.autocast("cpu", dtype=torch.bfloat16)
            return autocast(dev, cfg.amp)

        def to_image(x_tanh: torch.Tensor) -> torch.Tensor:
            """[-1, 1] -> [0, 1]: ``clamp(center + scale * x)`` per channel (see :func:`image_affine`)."""
            return torch.addcmul(center_t, scale_t, x_tanh).clamp_(0.0, 1.0)

        def sample_z(n: int) -> torch.Tensor:
            return torch.randn(n, cfg.nz, generator=gen_dev, device=gen_dev.device).to(dev)

        def new_probes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """A generator batch (pre-tanh, with its graph), its probe points as queries and directions."""
            with mixed(generator=True):
                x_pre = netg(sample_z(cfg.batch_size), pre_x=True)
            x_pre = x_pre.float()
            points, u = probe_points(x_pre, m=cfg.grad_m, epsilon=cfg.grad_epsilon, generator=gen_dev)
            return x_pre, u, to_image(torch.tanh(points))

        def recover(probs: torch.Tensor) -> torch.Tensor:
            return recover_logits(probs, method=cfg.logit_recovery)  # type: ignore[arg-type]

        if eval_every is None:
            eval_every = max(cost, budget // 10)
        history: list[dict[str, Any]] = []
        next_eval = eval_every
        loss_c = loss_g = torch.full((), float("nan"), device=dev)
        window_start = iterations - max(1, iterations // 10)  # the held-out score's last tenth
        hits = torch.zeros((), dtype=torch.long, device=dev)  # since the last report (no host sync)
        seen = 0
        final_hits = torch.zeros((), dtype=torch.long, device=dev)
        final_seen = 0
        n_clone = cfg.d_iter * cfg.batch_size
        # the first iteration's probes are answered alone; afterwards each iteration's clone batches and the
        # next iteration's probes (both made by the same generator weights) share one oracle call
        clone.eval()  # probes are asked with the clone in eval mode (adaptive variants tell them apart by it)
        probe = new_probes()
        probe_target = recover(ledger.query(probe[2]))
        for it in range(iterations):
            # (1) generator: zeroth-order estimate of d(-L1)/dx on the pre-tanh image
            netg.train()
            clone.eval()
            for j in range(cfg.g_iter):
                if j > 0 or (it > 0 and not cfg.fuse):  # probes of the updated generator, asked alone
                    probe = new_probes()
                    probe_target = recover(ledger.query(probe[2]))
                x_pre, u, x_probe = probe
                with torch.no_grad():
                    losses = -(clone(x_probe).float() - probe_target).abs().mean(dim=1)
                grad, loss_at_x = combine_probes(losses, u, epsilon=cfg.grad_epsilon)
                opt_g.zero_grad(set_to_none=True)
                # the reference's scale: mean over the batch and a redundant 1 / num_classes
                x_pre.backward(grad / (k * cfg.batch_size))
                opt_g.step()
                loss_g = loss_at_x.mean().detach()
            # (2) one oracle call: the clone's fresh generated batches (+ the next iteration's probes)
            with torch.no_grad(), mixed(generator=True):
                x_clone = torch.cat([to_image(netg(sample_z(cfg.batch_size)).float()) for _ in range(cfg.d_iter)]
                                    or [torch.empty(0, c, h, w, device=dev)])
            last = it == iterations - 1
            if cfg.fuse:
                if not last:
                    probe = new_probes()
                x_ask = x_clone if last else torch.cat([x_clone, probe[2]])
                targets = recover(ledger.query(x_ask)) if len(x_ask) else torch.empty(0, k, device=dev)
                probe_target = targets[n_clone:]
                if last:  # the attacker's last paid batches, kept for preset selection (bench/select_dfme_preset.py)
                    self._last_queries = (x_clone.detach(), targets[:n_clone].argmax(1))
                # (an empty split is still one empty batch: a weight-decay-only step when d_iter = 0)
                batches = (zip(x_clone.split(cfg.batch_size), targets[:n_clone].split(cfg.batch_size)) if n_clone
                           else ())
            else:  # asked lazily, batch by batch, once the clone is in train mode
                batches = ((xb, recover(ledger.query(xb))) for xb in x_clone.split(cfg.batch_size) if len(xb))
            # (3) d_iter clone steps: L1 to the recovered victim logits
            clone.train()
            for xb, tb in batches:
                with mixed():
                    out = clone(xb)
                out = out.float()
                agree = (out.detach().argmax(1) == tb.argmax(1)).sum()  # held out: not trained on yet
                hits += agree
                seen += len(xb)
                if it >= window_start:
                    final_hits += agree
                    final_seen += len(xb)
                loss = F.l1_loss(out, tb)
                opt_c.zero_grad(set_to_none=True)
                loss.backward()
                opt_c.step()
                loss_c = loss.detach()
            if cfg.d_iter > 0:
                sched_c.step()
            sched_g.step()
            if evaluate is not None and (ledger.spent >= next_eval or last):
                row = {"iteration": it + 1, "loss_clone": float(loss_c), "loss_generator": float(loss_g),
                       "heldout_agreement": float(hits) / max(seen, 1)}
                hits.zero_()
                seen = 0
                evaluate(clone, queries=ledger.spent, **row)
                log.debug("dfme %d/%d queries: %s", ledger.spent, budget, row)
                while next_eval <= ledger.spent:
                    next_eval += eval_every
                clone.train()
        clone.eval()
        ledger.check(expected=iterations * cost)
        spent = ledger.spent
        seconds = time.perf_counter() - t0
        log.info("dfme: %d iterations, %d queries (%d unused) in %.1fs", iterations, spent, budget - spent,
                 seconds)
        return AttackResult(
            clone=clone, queries_used=spent, history=history, seconds=seconds,
            extra={"iterations": iterations, "cost_per_iteration": cost, "unused_queries": budget - spent,
                   "loss_clone": float(loss_c), "loss_generator": float(loss_g), "preset": self.preset,
                   "image_center": center, "image_scale": scale, "image_source": image_how,
                   "cpu_bf16": use_bf16,
                   "heldout_agreement": float(final_hits) / final_seen if final_seen else None},
        )
