"""MISLEADER: ensembles of distilled models trained to mislead a simulated extraction attacker.

Paper: Cheng, Zheng, Zhu and Dong, "MISLEADER: Defending against Model Extraction with Ensembles of
Distilled Models", arXiv 2506.02362, https://arxiv.org/abs/2506.02362. Reference code:
``LabRAI/misleader`` (``Defense/train_defense.py``, ``Defense/ensemble.py``), as read in
``shared/research/misleader-code.md``.

Each member ``d`` of the ensemble is distilled from the victim ``t`` (the defender's own model) while
an inner clone ``s`` of the same architecture, kept for the whole run, imitates ``d`` on strongly
augmented training images (the simulated attacker query distribution, see
:func:`misleader.data.augment.strong_augmentation`). Algorithm 1, per mini-batch, in this order:

(a) clone step (inner min), ``d`` fixed: ``a_iter`` SGD steps of ``s`` on
    ``KL(d(x_aug) || s(x_aug))`` over a strongly augmented batch drawn from a separately shuffled
    copy of the training split;
(b) defense step (outer), against the updated ``s`` (detached):
    ``alpha * T^2 * KL(softmax(t(x)/T) || softmax(d(x)/T)) + (1 - alpha) * CE(d(x), y)
    - lambda * KL(d(x_aug) || s(x_aug))``, the gradient flowing only through ``d``.

Both optimisers are SGD with momentum, a cosine schedule and gradient-norm clipping; AMP on CUDA.
Members are trained independently (each against its own clone) and served by soft voting, the
unweighted mean of their softmaxes (:class:`misleader.oracle.EnsembleOracle`). ``lambda = 0`` is
plain knowledge distillation (the clone and the augmentation are then skipped entirely).

Files: ``defend_misleader(out=DIR)`` writes ``DIR/members/NAME/`` (``model.safetensors`` +
``model.json`` the member, ``clone.*`` its inner clone, ``history.json``, ``result.json``),
``DIR/plan.json`` (what was asked), ``DIR/manifest.json`` (what :func:`misleader.load_oracle` opens),
``DIR/history.json`` and ``DIR/result.json``; ``DIR/fingerprint.json`` holds the settings, so that a
re-run resumes only with the same ones (an unfinished member resumes from
``members/NAME/resume.safetensors`` after its last epoch), see :func:`defend_misleader`.

Package layout: :mod:`~misleader.defenses.misleader.config` (settings, defaults, presets),
:mod:`~misleader.defenses.misleader.losses`, :mod:`~misleader.defenses.misleader.trainer` (the
per-batch updates and one member's epochs, run by :func:`misleader.training.loop.fit`),
:mod:`~misleader.defenses.misleader.diagnostics` and :mod:`~misleader.defenses.misleader.folder`
(the ensemble folder).

Deviations from the reference code:
    * ``a_iter`` inner steps are real optimiser steps. The reference computes the same loss on the
      same batch with the same weights ``a_iter = 5`` times, accumulates the 5 identical gradients
      and takes one step (SGD lr 0.01, clip 5, weight decay 5e-4). Our default (``a_iter = 1``,
      ``clone_lr = 0.05``, ``clone_grad_clip = 1``, ``clone_weight_decay = 1e-4``) is that very
      update with a fifth of the clone passes (about half the cost of a whole step, see
      ``bench/bench_misleader_step.py``): clip(5g, 5) = 5 clip(g, 1), and with momentum buffer
      ``b' = b / 5`` by induction, ``0.05 b' = 0.01 b`` (exact for models without BatchNorm or
      dropout, whose repeated forwards differ only in running statistics / dropout masks). The
      literal behaviour is kept as ``inner_mode="accumulate"`` (:data:`REFERENCE_INNER`).
    * ``d(x_aug)`` is computed once per batch and reused (detached) as the clone's target and (with
      its graph) in the defense loss; ``d`` does not change in between, so the values are the same.
      The reference runs 6 train-mode forwards of ``d`` on ``x_aug`` per batch, so ``d``'s BatchNorm
      running statistics see the augmented batch once here instead of 6 times. For a member without
      BatchNorm (the LeNets) ``d(x)`` and ``d(x_aug)`` are one forward of the concatenated batch
      (the same numbers, fewer kernel launches).
    * Model selection (best member, early stopping with the reference's patience
      ``max(5, epochs // 2)``) uses the validation split; the reference selects on the test set.
      The defender trains on ``splits.train`` only (never on validation or attacker data).
    * Cosine schedules are stepped per batch over the whole run, with no dummy first step (the
      reference steps per epoch after a dummy step, so its schedule is shifted by one epoch).
    * Both KL terms are computed exactly from log-softmaxes; the reference clamps probabilities at
      1e-10 (teacher) and 1e-7 (defense) before taking logs.
    * The attacker batches come from a fresh permutation of the training split each epoch (the
      reference cycles a second loader of the same length, which is the same for equal lengths);
      incomplete last batches are dropped. Augmentation is batched on the device with kornia (see
      :mod:`misleader.data.augment` for its own deviations).
    * Without clean augmentation (MNIST family) the victim's logits on the training split are
      computed once and cached (the same values; saves one teacher forward per batch).
    * AMP uses bf16 where the GPU supports it (no loss scaling), else fp16 with one GradScaler per
      optimiser (the reference shares one).
    * The teacher is whatever victim folder is given (the reference forces resnet34_8x / lenet5);
      member files are named after the member's architecture (the reference uses the attacker's).
    * The reference ships no settings for the LeNet family on MNIST; ours are in
      :data:`DEFAULT_MEMBER_SETTINGS` with the reasons next to them.
"""

from __future__ import annotations

from misleader.defenses.misleader.config import (
    AUTO_PRESET,
    DEFAULT_MEMBER_SETTINGS,
    FALLBACK_MEMBER_SETTINGS,
    PAPER_URL,
    PRESETS,
    REFERENCE_INNER,
    MemberConfig,
    Preset,
    get_preset,
    member_config,
)
from misleader.defenses.misleader.diagnostics import evaluate_defense
from misleader.defenses.misleader.folder import defend_misleader, member_names, member_seed
from misleader.defenses.misleader.losses import attacker_term, clone_loss, kd_loss, kl_rows
from misleader.defenses.misleader.trainer import MemberResult, MemberTrainer, resolve_clean_augment, train_member

__all__ = [
    "AUTO_PRESET", "DEFAULT_MEMBER_SETTINGS", "MemberConfig", "MemberResult", "MemberTrainer", "PRESETS", "Preset",
    "REFERENCE_INNER", "attacker_term", "clone_loss", "defend_misleader", "evaluate_defense", "get_preset", "kd_loss",
    "kl_rows", "member_config", "member_names", "member_seed", "resolve_clean_augment", "train_member",
]
