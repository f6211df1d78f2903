"""DFMS-HL: data-free model stealing with hard labels, a proxy-trained GAN and a diversity loss.

Sanyal, Addepalli and Babu, "Towards Data-Free Model Stealing in a Hard Label Setting", CVPR 2022,
https://arxiv.org/abs/2204.11022 (reference code: ``val-iisc/Hard-Label-Model-Stealing``,
``code/train_generator/{dcgan.py,train_generator_clone.py}``, ``code/train_student/train_student.py``;
notes in ``shared/research/attacks.md`` section 2).

The attacker has a *proxy* set of unlabelled images from another distribution (the harness's pool,
e.g. Fashion-MNIST against an MNIST victim) and a victim that answers top-1 labels only. Stages:

1. **DCGAN on the proxy** (``gan_epochs``; no queries): D step on real vs fake, then G step.
2. **Validation set** (``val_size`` DCGAN samples labelled by the victim; the reference's
   ``generate_val_data.py``), used only to select the final clone (below).
3. **Clone pre-training** (``pretrain_proxy`` proxy images + ``pretrain_fake`` DCGAN samples, each
   labelled by one query; ``pretrain_epochs`` of SGD with cross-entropy, pad-crop augmentation).
   Skipped when ``pretrain_epochs`` is 0.
4. **Alternating training** (the paper's main stage), one iteration per proxy batch of ``batch_size``:

   * clone step: ``x = augment(G(z))``, query the victim's labels for ``x`` (``batch_size``
     queries), one SGD step of ``CE(clone(x), labels)``; update moving averages of the clone;
   * generator step (clone in eval mode): ``BCE(D(G(z)), real) + diversity_weight * L_div`` with
     ``L_div = sum_k pbar_k log pbar_k`` and ``pbar`` the batch mean of ``softmax(clone(G(z)) / T)``
     (maximising the entropy of the clone's mean prediction balances the generated classes);
   * discriminator step on the augmented real proxy batch against the (detached) fakes.

   It runs ``(budget - queries of stages 2-3) // batch_size`` iterations; the clone's lr warms up
   linearly over ``warmup_epochs`` proxy epochs (``len(proxy) // batch_size`` iterations each) and
   then follows a cosine to 0. Every ``select_every`` iterations (default: one proxy epoch), at the
   end, and once before stage 4, the clone and its moving averages (``ema_taus``) are scored by
   class-balanced accuracy on the validation set; the best weights are returned. With
   ``val_size=0`` there is no selection and the final clone is returned.

Every query is counted by the oracle; stage 1 never queries (the reference's logging-only victim
forward on the fakes is dropped). The oracle must answer labels (``output="labels"``).

Presets (:data:`PRESETS`): ``paper`` (the scripted settings: ngf 64, 200 GAN epochs, a 20k
validation set, a 50k/25k labelled pre-training set, 200 pre-training epochs; GPU scale) and ``cpu``
(an MNIST-sized victim on a CPU: a 10k-image proxy, DCGAN ngf/ndf 32 trained 5 epochs, a 2k
validation set, 10k + 10k labelled pre-training images and 10 pre-training epochs at lr 0.01,
pad-crop without flips). For the paper's CIFAR-10 setting use the ``cifar100`` pool with
``proxy_classes=CIFAR100_40_CLASSES``.

Deviations from the reference code:
    * Images are mapped to [0, 1] (``(x + 1) / 2``) before querying and before the clone: our models
      normalise inside. The discriminator keeps seeing [-1, 1] images, as in the reference.
    * AutoAugment (a PIL CIFAR policy applied image by image) is replaced by batched pad-crop
      (+ optional horizontal flip) on the generated images; flips are off in the ``cpu`` preset
      because digits are not mirror-symmetric.
    * The paper's stages 3-5 (clone on proxy + DCGAN data, a separate "DivGAN" fine-tuning of the
      generator with the diversity loss, and a second clone on proxy + DivGAN data with its own
      validation set) are compressed into one pre-training stage on proxy + DCGAN data.
    * Model selection is simplified: every candidate (the live clone and each moving average) is
      scored at each selection point and the best is kept. The reference scores the live clone
      on two validation sets each epoch, scores the moving averages only when the live clone
      improves, and re-tests the winner on the test set. The final number here is never chosen on
      the test set (the reference reports the best test accuracy over epochs).
    * Stage 3 draws shuffled mini-batches from the union of the labelled proxy and DCGAN images
      instead of fixed per-source proportions of each batch, and labels exactly the images it
      trains on (the reference labels all 50,000 rows of a buffer, including unused zero images,
      and queries the victim again on every training batch without using the answer).
    * Warm-up: linear from ``lr / steps`` to ``lr`` over ``warmup_epochs`` (10) proxy epochs, then
      the cosine, both per iteration. The reference sets ``lr = 0.001 * epoch`` after each of epochs
      0-9, so epoch 0 trains at the full lr and epoch 1 at lr 0, and then resumes its per-epoch
      cosine from there.
    * The generator and discriminator grads that the reference accumulates into the clone (and the
      generator loss into D) are not computed (``requires_grad_(False)`` during those steps, or
      ``backward(inputs=...)``); the reference zeroed them before use, so the updates are the same.
    * In stage 4 the discriminator's forward on the fakes is shared by the generator step and the
      discriminator step that follows it (the reference runs it twice with the same D weights on the
      same images: same values; D's BatchNorm running statistics, which nothing reads, are updated
      once per iteration instead of twice).
    * Randomness comes from the ``torch.Generator`` given to :meth:`DFMSHL.run`.

Precision on CPU (``cpu_bf16``, as DFME's): ``None`` ("auto") runs the DCGAN's generator and discriminator forwards
(and so their backwards) under bfloat16 autocast on a CPU with native bfloat16 arithmetic (AMX or AVX512-BF16); the
clone learns and is scored in float32, and every loss is computed in float32. ``True`` / ``False`` force it. The GAN is
most of a stage-4 iteration's arithmetic (issue 10: 0.185 CPU-s per iteration in float32 on one AMD EPYC core, so a
1M-query run took 52 CPU-minutes). bf16 rounding changes the numbers: the same seed gives the same run on the same kind
of CPU; ``extra["cpu_bf16"]`` records what was used.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from misleader.attacks.accounting import QueryLedger, device_generator
from misleader.attacks.base import Attack, AttackResult, Evaluator, check_range, register_attack
from misleader.attacks.dfme import cpu_has_bf16
from misleader.data.loader import to_unit
from misleader.errors import MisleaderError
from misleader.models.generators import DCGANDiscriminator, DCGANGenerator, tanh_to_unit
from misleader.oracle import Oracle
from misleader.training.train import crop_flip
from misleader.utils import autocast, derive_seed, forked_rng

log = logging.getLogger(__name__)

#: CIFAR-100 fine-label indices of the reference's 40-class proxy (no overlap with CIFAR-10):
#: flowers (orchid, poppy, rose, sunflower, tulip), containers (bottle, bowl, can, cup, plate),
#: fruit and vegetables (apple, mushroom, orange, pear, sweet_pepper), household devices (clock,
#: keyboard, lamp, telephone, television), furniture (bed, chair, couch, table, wardrobe), trees
#: (maple, oak, palm, pine, willow), large man-made outdoor things (bridge, castle, house, road,
#: skyscraper), natural outdoor scenes (cloud, forest, mountain, plain, sea).
CIFAR100_40_CLASSES: tuple[int, ...] = (
    54, 62, 70, 82, 92, 9, 10, 16, 28, 61, 0, 51, 53, 57, 83, 22, 39, 40, 86, 87,
    5, 20, 25, 84, 94, 47, 52, 56, 59, 96, 12, 17, 37, 68, 76, 23, 33, 49, 60, 71,
)

#: proxy pool used when the caller names none: another distribution than the victim's
DEFAULT_PROXY = {
    "mnist": "fashion-mnist",
    "fashion-mnist": "mnist",
    "digits": "fashion-mnist",
    "cifar10": "cifar100",
    "cifar100": "cifar10",
    "svhn": "cifar10",
}


def diversity_loss(logits: torch.Tensor, *, temperature: float = 1.0, eps: float = 1e-5) -> torch.Tensor:
    """Class-diversity loss ``sum_k pbar_k log(pbar_k + eps)``, ``pbar = mean_i softmax(logits_i / T)``.

    Minimising it maximises the entropy of the batch-mean prediction (its minimum, ``-log K`` up to
    ``eps``, is reached by a batch whose mean prediction is uniform). ``eps`` as in the reference.

    Shape: (N, K) logits -> scalar.
    """
    pbar = torch.softmax(logits.float() / temperature, dim=1).mean(dim=0)
    return (pbar * torch.log(pbar + eps)).sum()


@dataclass(frozen=True)
class DFMSHLConfig:
    """DFMS-HL hyper-parameters; the defaults are the reference scripts' (see :data:`PRESETS`)."""

    batch_size: int = 64
    nz: int = 100
    ngf: int = 64
    ndf: int = 64
    gan_epochs: int = 200
    gan_lr: float = 2e-4
    gan_beta1: float = 0.5
    proxy_size: int | None = None
    proxy_classes: tuple[int, ...] | None = None
    pretrain_proxy: int = 50_000
    pretrain_fake: int = 25_000
    pretrain_epochs: int = 200
    pretrain_batch: int = 128
    pretrain_lr: float = 0.1
    diversity_weight: float = 500.0
    temperature: float = 1.0
    clone_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 10.0
    val_size: int = 20_000
    ema_taus: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999, 0.9995, 0.9998)
    select_every: int | None = None
    pad: int = 4
    flip: bool = True
    amp: bool = True
    cpu_bf16: bool | None = None

    def __post_init__(self) -> None:
        check_range("dfms-hl", self, positive=("batch_size", "nz", "ngf", "ndf", "pretrain_batch", "gan_lr",
                                               "pretrain_lr", "clone_lr"),
                    non_negative=("gan_epochs", "pretrain_proxy", "pretrain_fake", "pretrain_epochs", "pad",
                                  "val_size", "momentum", "weight_decay", "diversity_weight"),
                    fractions=("gan_beta1",))
        if self.proxy_size is not None and self.proxy_size < 1:
            raise MisleaderError(f"dfms-hl option proxy_size must be >= 1 or None, got {self.proxy_size}")
        if self.warmup_epochs < 0:
            raise MisleaderError(f"dfms-hl option warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if any(not 0 <= t < 1 for t in self.ema_taus):
            raise MisleaderError(f"dfms-hl ema_taus must lie in [0, 1), got {self.ema_taus}")
        if self.select_every is not None and self.select_every < 1:
            raise MisleaderError(f"dfms-hl option select_every must be >= 1 or None, got {self.select_every}")
        if not self.temperature > 0:
            raise MisleaderError(f"dfms-hl option temperature must be > 0, got {self.temperature}")


#: ``paper``: the reference scripts (GPU scale). ``small`` (alias ``cpu``): an MNIST-sized victim on 2 CPU
#: cores: the research notes' "minimal CPU version" (``shared/research/attacks.md`` section 2: a 10k proxy,
#: DCGAN ngf 32 pre-trained 5 epochs, 10k + 10k labelled pre-training images, pad-crop without flips),
#: scaled down from the scripts without looking at any test accuracy; the 2k validation set is the
#: attacker's own held-out, victim-labelled queries on which the returned clone is selected (``_Selector``).
#: ``preset="auto"`` (the default) picks ``small`` for 1-channel targets, else ``paper``.
PRESETS: dict[str, DFMSHLConfig] = {
    "paper": DFMSHLConfig(),
    "cpu": DFMSHLConfig(ngf=32, ndf=32, gan_epochs=5, proxy_size=10_000, pretrain_proxy=10_000,
                        pretrain_fake=10_000, pretrain_epochs=10, pretrain_lr=0.01, val_size=2_000,
                        flip=False),
}
PRESETS["small"] = PRESETS["cpu"]


def _warmup_cosine(step: int, total: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total - warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, span) / span))


class _Selector:
    """Model selection on the attacker's own victim-labelled validation set (never the test set).

    Keeps exponential moving averages of the clone's weights (one per ``tau``, as the reference) and,
    at each :meth:`consider`, scores the clone and every average by class-balanced accuracy (the mean
    per-class recall over the classes present in the labels, as the reference's confusion-matrix
    score); the best weights seen are restored by :meth:`load_best`.
    """

    def __init__(self, clone: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor, *, taus: tuple[float, ...],
                 num_classes: int) -> None:
        self.clone, self.x_val, self.y_val, self.taus, self.k = clone, x_val, y_val, taus, num_classes
        self._live = [t for t in clone.state_dict().values() if t.is_floating_point()]
        self._ema = [[t.detach().clone() for t in self._live] for _ in taus]
        self._scratch = copy.deepcopy(clone).eval()
        self._scratch_t = [t for t in self._scratch.state_dict().values() if t.is_floating_point()]
        self.best_score, self.best_name, self.best_iteration = -1.0, "", -1
        self._best: list[torch.Tensor] = [t.detach().clone() for t in self._live]

    @torch.no_grad()
    def update_ema(self) -> None:
        for tau, ema in zip(self.taus, self._ema):
            torch._foreach_lerp_(ema, self._live, 1.0 - tau)

    @torch.no_grad()
    def _score(self, tensors: list[torch.Tensor]) -> float:
        for dst, src in zip(self._scratch_t, tensors):
            dst.copy_(src)
        pred = torch.cat([self._scratch(x).argmax(1) for x in self.x_val.split(1024)])
        correct = (pred == self.y_val).float()
        per_class = torch.zeros(self.k, device=correct.device).index_add_(0, self.y_val, correct)
        counts = torch.bincount(self.y_val, minlength=self.k)
        present = counts > 0
        return float((per_class[present] / counts[present]).mean())

    def consider(self, name: str, iteration: int) -> None:
        """Score the live clone (as ``name``) and every moving average; remember the best."""
        for cand, tensors in [(name, self._live)] + [(f"ema{t:g}", e) for t, e in zip(self.taus, self._ema)]:
            score = self._score(tensors)
            if score > self.best_score:
                self.best_score, self.best_name, self.best_iteration = score, cand, iteration
                self._best = [t.detach().clone() for t in tensors]

    @torch.no_grad()
    def load_best(self) -> dict[str, Any]:
        """Copy the best weights into the clone; returns what was chosen."""
        for dst, src in zip(self._live, self._best):
            dst.copy_(src)
        log.info("dfms-hl: selected %s at stage-4 iteration %d (balanced validation accuracy %.4f)",
                 self.best_name, self.best_iteration, self.best_score)
        return {"selected": self.best_name, "selected_iteration": self.best_iteration,
                "val_balanced_accuracy": self.best_score}


@register_attack("dfms-hl")
class DFMSHL(Attack):
    """Hard-label data-free model stealing (DFMS-HL) with a proxy-trained DCGAN.

    Args:
        preset: ``"auto"`` (default: :meth:`choose_preset` for the target) or a key of :data:`PRESETS`
            (``paper``, ``small``/``cpu``).
        **overrides: any :class:`DFMSHLConfig` field, replacing the preset's value; type-checked.

    The proxy images come from the harness's pool (:meth:`prepare`); by default another
    distribution than the victim's (:data:`DEFAULT_PROXY`).

    Raises:
        MisleaderError: unknown preset or option, or an invalid value.

    Example:
        >>> DFMSHL(preset="cpu").batch_size
        64
    """

    requires = frozenset({"labels"})
    needs_pool = True
    presets = PRESETS
    scale_presets = ("small", "paper")  # 1-channel <= 32x32 targets: small
    option_casts = {"proxy_classes": int, "ema_taus": float}

    def __init__(self, *, preset: str = "auto", **overrides: Any) -> None:
        self._configure(preset, overrides)

    @classmethod
    def tiny_options(cls) -> dict[str, Any]:
        """The smallest sensible configuration (tests, conformance, benchmarks): 8 validation and 24
        pre-training queries, then 8 per iteration, a 32-image proxy and a 4-wide DCGAN trained one epoch."""
        return {"preset": "cpu", "batch_size": 8, "nz": 8, "ngf": 4, "ndf": 4, "gan_epochs": 1,
                "proxy_size": 32, "val_size": 8, "pretrain_proxy": 16, "pretrain_fake": 8,
                "pretrain_epochs": 1, "pretrain_batch": 8}

    @classmethod
    def choose_pool(cls, target_meta: dict[str, Any]) -> str:
        """A proxy from another distribution than the target's (:data:`DEFAULT_PROXY`)."""
        ds = str(target_meta.get("dataset", ""))
        if ds not in DEFAULT_PROXY:
            raise MisleaderError(f"dfms-hl has no default proxy set for a {ds!r} target: pass --pool "
                                 "(another dataset than the target's, or npz:PATH)")
        return DEFAULT_PROXY[ds]

    def pretrain_queries(self, proxy_len: int) -> int:
        """Queries spent before stage 4 for a proxy of ``proxy_len`` images (after ``proxy_classes``):
        the validation set (``val_size``) plus the pre-training images (none if ``pretrain_epochs`` is 0)."""
        cfg = self._cfg
        n = proxy_len if cfg.proxy_size is None else min(proxy_len, cfg.proxy_size)
        pre = 0 if cfg.pretrain_epochs == 0 else min(cfg.pretrain_proxy, n) + cfg.pretrain_fake
        return cfg.val_size + pre

    # ------------------------------------------------------------------ helpers
    def _proxy(self, gen: torch.Generator) -> torch.Tensor:
        x, y = self.pool_data()
        cfg = self._cfg
        if cfg.proxy_classes is not None:
            if y is None:
                raise MisleaderError("dfms-hl proxy_classes needs a pool with its own labels: "
                                     "name a dataset as the pool")
            keep = torch.isin(y, torch.tensor(cfg.proxy_classes, dtype=y.dtype))
            x = x[keep]
            if len(x) == 0:
                raise MisleaderError(f"no pool image belongs to proxy_classes {cfg.proxy_classes}")
        perm = torch.randperm(len(x), generator=gen)
        if cfg.proxy_size is not None:
            perm = perm[: cfg.proxy_size]
        return x[perm]

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        cfg = self._cfg
        return crop_flip(x, padding=cfg.pad, flip=cfg.flip, generator=gen) if cfg.pad > 0 or cfg.flip else x

    # ------------------------------------------------------------------ the attack
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
        """Steal ``oracle`` (top-1 labels) into ``clone`` with at most ``budget`` queries.

        Args:
            oracle: a label oracle (``output="labels"``).
            budget: query budget: stages 2-3 labelling plus ``batch_size`` per stage-4 iteration.
            clone: classifier in [0, 1] input space returning (N, K) logits; trained in place.
            generator: seeds every random choice (proxy subset, GAN weights, latents, augmentation).
            device: where the GAN and the clone run.
            evaluate: optional harness callback (history only, never used for decisions).
            eval_every: queries between evaluations (default: about a tenth of the budget).

        Returns:
            :class:`AttackResult`; ``extra`` holds the per-stage query counts and iterations.

        Raises:
            ValueError: the oracle does not answer labels, or the budget is invalid.
            MisleaderError: no pool was given, the input is not 32x32, or the budget cannot pay for
                stages 2-3 and one stage-4 batch.
        """
        self.check_oracle(oracle, budget)
        cfg = self._cfg
        c, h, w = oracle.input_shape
        if (h, w) != (32, 32):
            raise MisleaderError(f"dfms-hl's DCGAN makes 32x32 images; the oracle takes {c}x{h}x{w}")
        dev = torch.device(device)
        t0 = time.perf_counter()
        ledger = QueryLedger(oracle, attack="dfms-hl", device=dev)
        gen_cpu = torch.Generator().manual_seed(derive_seed(generator))  # augmentation, shuffles
        gen_dev = device_generator(generator, dev)  # latents
        proxy = self._proxy(gen_cpu).to(dev)  # uint8 (P, C, 32, 32)
        n_pre = self.pretrain_queries(len(proxy))
        iterations = (budget - n_pre) // cfg.batch_size
        if iterations < 1:
            raise MisleaderError(
                f"dfms-hl needs {n_pre} queries for validation and pre-training plus {cfg.batch_size} "
                "per iteration, "
                f"got a budget of {budget}: raise --budget or lower val_size / pretrain_proxy / pretrain_fake"
            )
        with forked_rng(generator, dev):
            netg = DCGANGenerator(nz=cfg.nz, ngf=cfg.ngf, nc=c).to(dev, memory_format=torch.channels_last)
            netd = DCGANDiscriminator(nc=c, ndf=cfg.ndf).to(dev, memory_format=torch.channels_last)
        clone.to(dev)
        k = oracle.num_classes
        history: list[dict[str, Any]] = []
        if eval_every is None:
            eval_every = max(cfg.batch_size, budget // 10)
        next_eval = eval_every

        def labels_of(x_unit: torch.Tensor) -> torch.Tensor:
            y = ledger.query(x_unit)
            if y.dtype != torch.int64 or y.dim() != 1:
                raise RuntimeError(
                    f"dfms-hl expects (N,) int64 labels from the oracle, got {y.dtype} {tuple(y.shape)}")
            return y

        def record(stage: str, **extra: Any) -> None:
            nonlocal next_eval
            if evaluate is None:
                return
            row = {"stage": stage, **extra}
            evaluate(clone, queries=ledger.spent, **row)
            log.debug("dfms-hl %d/%d queries: %s", ledger.spent, budget, row)
            while next_eval <= ledger.spent:
                next_eval += eval_every

        def z(n: int) -> torch.Tensor:
            return torch.randn(n, cfg.nz, generator=gen_dev, device=gen_dev.device).to(dev)

        bce = nn.BCELoss()
        opt_g = torch.optim.Adam(netg.parameters(), lr=cfg.gan_lr, betas=(cfg.gan_beta1, 0.999))
        opt_d = torch.optim.Adam(netd.parameters(), lr=cfg.gan_lr, betas=(cfg.gan_beta1, 0.999))
        ones = torch.ones(cfg.batch_size, device=dev)
        zeros = torch.zeros(cfg.batch_size, device=dev)

        g_params, d_params = list(netg.parameters()), list(netd.parameters())

        use_bf16 = dev.type == "cpu" and (cpu_has_bf16() if cfg.cpu_bf16 is None else cfg.cpu_bf16)

        def gan_precision() -> Any:
            """The mixed precision of the DCGAN's forwards (and so of their backwards): bfloat16 autocast on a CPU
            with native bfloat16 arithmetic (``use_bf16``), else the CUDA AMP of ``amp``. The clone is never in it."""
            return torch.autocast("cpu", dtype=torch.bfloat16) if use_bf16 else autocast(dev, cfg.amp)

        def d_step(real_pm1: torch.Tensor, fake_pm1: torch.Tensor, *,
                   out_fake: torch.Tensor | None = None) -> torch.Tensor:
            """Discriminator: BCE(D(real), 1) + BCE(D(fake), 0); images in [-1, 1].

            ``out_fake``: D's float32 output on ``fake_pm1`` with its graph, if already computed with the current
            D weights (only D's parameters get gradients).
            """
            n = len(real_pm1)
            with gan_precision():
                out_real = netd(real_pm1).float()
                if out_fake is None:
                    out_fake = netd(fake_pm1.detach()).float()
            loss = bce(out_real, ones[:n]) + bce(out_fake, zeros[: len(fake_pm1)])
            opt_d.zero_grad(set_to_none=True)
            loss.backward(inputs=d_params)
            opt_d.step()
            return loss.detach()

        def real_batches() -> Any:
            """Endless augmented proxy batches in [-1, 1], reshuffled every pass (drop_last)."""
            while True:
                perm = torch.randperm(len(proxy), generator=gen_cpu).to(dev)
                for s in range(0, len(perm) - cfg.batch_size + 1, cfg.batch_size):
                    yield self._augment(to_unit(proxy[perm[s: s + cfg.batch_size]]), gen_cpu) * 2 - 1

        if len(proxy) < cfg.batch_size:
            raise MisleaderError(f"dfms-hl needs at least batch_size={cfg.batch_size} proxy images, "
                                 f"got {len(proxy)}: lower batch_size or pass a larger pool")
        reals = real_batches()
        steps_per_epoch = len(proxy) // cfg.batch_size

        # ---------------- stage 1: DCGAN on the proxy (no queries)
        netg.train()
        netd.train()
        for _ in range(cfg.gan_epochs * steps_per_epoch):
            real = next(reals)
            with gan_precision():
                fake = netg(z(cfg.batch_size)).float()
            d_step(real, fake)
            netd.requires_grad_(False)
            with gan_precision():
                out = netd(fake)
            loss_g = bce(out.float(), ones)  # BCE is not autocast-safe: compute it in float32
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            netd.requires_grad_(True)
        log.info("dfms-hl: DCGAN trained %d epochs on %d proxy images (no queries)", cfg.gan_epochs,
                 len(proxy))

        # ---------------- stage 2: a victim-labelled validation set of DCGAN samples (model selection)
        x_val = y_val = None
        if cfg.val_size > 0:
            netg.eval()
            with torch.no_grad():
                parts = []
                for s in range(0, cfg.val_size, 1024):
                    with gan_precision():
                        fakes = netg(z(min(1024, cfg.val_size - s))).float()
                    parts.append(tanh_to_unit(fakes).clamp_(0, 1))
            x_val = torch.cat(parts)
            y_val = torch.cat([labels_of(part) for part in x_val.split(1024)])

        # ---------------- stage 3: label proxy + DCGAN samples, pre-train the clone
        n_train = n_pre - cfg.val_size
        if n_train > 0:
            n_proxy = n_train - cfg.pretrain_fake
            xs = [to_unit(proxy[:n_proxy])] if n_proxy > 0 else []
            netg.eval()
            with torch.no_grad():
                for s in range(0, cfg.pretrain_fake, 1024):
                    with gan_precision():
                        fakes = netg(z(min(1024, cfg.pretrain_fake - s))).float()
                    xs.append(tanh_to_unit(fakes).clamp_(0, 1))
            x_pre = torch.cat(xs)
            y_pre = torch.cat([labels_of(part) for part in x_pre.split(1024)])
            opt = torch.optim.SGD(clone.parameters(), lr=cfg.pretrain_lr, momentum=cfg.momentum,
                                  weight_decay=cfg.weight_decay)
            steps = cfg.pretrain_epochs * max(len(x_pre) // cfg.pretrain_batch, 1)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
            clone.train()
            for _ in range(cfg.pretrain_epochs):
                perm = torch.randperm(len(x_pre), generator=gen_cpu).to(dev)
                for s in range(0, max(len(perm) - cfg.pretrain_batch + 1, 1), cfg.pretrain_batch):
                    idx = perm[s: s + cfg.pretrain_batch]
                    xb = self._augment(x_pre[idx], gen_cpu)
                    with autocast(dev, cfg.amp):
                        loss = F.cross_entropy(clone(xb).float(), y_pre[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
            record("pretrain")
            del x_pre, y_pre, xs
        n_pretrain_spent = ledger.spent

        # ---------------- stage 4: alternating clone / generator / discriminator steps
        opt_c = torch.optim.SGD(clone.parameters(), lr=cfg.clone_lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
        warm = int(round(cfg.warmup_epochs * steps_per_epoch))
        sched_c = torch.optim.lr_scheduler.LambdaLR(opt_c, lambda s: _warmup_cosine(s, iterations, warm))
        selector = None
        if x_val is not None:
            selector = _Selector(clone, x_val, y_val, taus=cfg.ema_taus, num_classes=k)
            selector.consider("pretrained", 0)
        select_every = cfg.select_every or steps_per_epoch
        netg.train()
        netd.train()
        loss_c = loss_g_adv = loss_div = torch.full((), float("nan"), device=dev)  # host sync only when reported
        for it in range(iterations):
            real = next(reals)
            with gan_precision():
                fake = netg(z(cfg.batch_size)).float()  # [-1, 1], keeps the graph for the G step
            # clone step on augmented fakes labelled by the victim
            x_q = self._augment(tanh_to_unit(fake.detach()).clamp_(0, 1), gen_cpu)
            y_q = labels_of(x_q)
            clone.train()
            with autocast(dev, cfg.amp):
                loss = F.cross_entropy(clone(x_q).float(), y_q)
            opt_c.zero_grad(set_to_none=True)
            loss.backward()
            opt_c.step()
            sched_c.step()
            loss_c = loss.detach()
            if selector is not None:
                selector.update_ema()
            # generator step: fool D + class diversity on the clone (clone in eval mode, frozen). D's output on
            # the fakes is computed once and serves the discriminator step too (same D weights, same images):
            # each backward is restricted to its own model's parameters (``inputs=``)
            clone.eval()
            clone.requires_grad_(False)
            with gan_precision():
                out_d = netd(fake).float()
            with autocast(dev, cfg.amp):
                out_c = clone(tanh_to_unit(fake))
            adv = bce(out_d, ones)
            div = diversity_loss(out_c.float(), temperature=cfg.temperature)
            loss_gen = adv + cfg.diversity_weight * div
            opt_g.zero_grad(set_to_none=True)
            loss_gen.backward(inputs=g_params, retain_graph=True)
            opt_g.step()
            clone.requires_grad_(True)
            loss_g_adv, loss_div = adv.detach(), div.detach()
            # discriminator step (its fake half is out_d; the G step above does not change D or the fakes)
            d_step(real, fake, out_fake=out_d)
            if selector is not None and ((it + 1) % select_every == 0 or it == iterations - 1):
                selector.consider("clone", it + 1)
            if evaluate is not None and (ledger.spent >= next_eval or it == iterations - 1):
                record("alternate", iteration=it + 1, loss_clone=float(loss_c), loss_adv=float(loss_g_adv),
                       loss_div=float(loss_div))
                clone.train()
        selected: dict[str, Any] = {}
        if selector is not None:
            selected = selector.load_best()
            if evaluate is not None:
                evaluate(clone, queries=ledger.spent, stage="selected", **selected)
        clone.eval()
        ledger.check(expected=n_pre + iterations * cfg.batch_size)
        spent = ledger.spent
        seconds = time.perf_counter() - t0
        log.info("dfms-hl: %d validation/pre-training + %d x %d queries (%d unused) in %.1fs",
                 n_pretrain_spent, iterations, cfg.batch_size, budget - spent, seconds)
        return AttackResult(
            clone=clone, queries_used=spent, history=history, seconds=seconds,
            extra={"pretrain_queries": n_pretrain_spent, "iterations": iterations, "proxy_images": len(proxy),
                   "val_queries": cfg.val_size, "selected": selected, "warmup_iterations": warm,
                   "unused_queries": budget - spent, "loss_clone": float(loss_c), "loss_adv": float(loss_g_adv),
                   "loss_div": float(loss_div), "num_classes": k, "preset": self.preset, "cpu_bf16": use_bf16},
        )
