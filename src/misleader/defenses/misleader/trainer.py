"""MISLEADER member training: the per-batch updates of Algorithm 1 and the epoch loop of one member.

Paper: MISLEADER, arXiv 2506.02362, https://arxiv.org/abs/2506.02362 (see :mod:`misleader.defenses.misleader`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from misleader.data.augment import augment, strong_augmentation, weak_augmentation
from misleader.data.loader import to_unit
from misleader.defenses.misleader.config import MemberConfig
from misleader.defenses.misleader.losses import attacker_term, clone_loss, kd_loss
from misleader.metrics import accuracy
from misleader.training.evaluate import predict_probs
from misleader.training.loop import cpu_state, fit
from misleader.training.schedule import cosine_lambda
from misleader.utils import autocast, derive_seed, make_generator

log = logging.getLogger(__name__)



class MemberTrainer:
    """Optimisers and the per-batch updates of Algorithm 1 for one member ``d`` and its clone ``s``.

    Args:
        config: the member's settings.
        defense: the member ``d`` (a classifier returning logits, input in [0, 1]).
        clone: the inner clone ``s`` (ignored when ``config.lam == 0``; may be ``None`` then).
        device: where both live.
        total_steps: length of the cosine schedules (batches in the whole run).
    """

    def __init__(self, *, config: MemberConfig, defense: nn.Module, clone: nn.Module | None,
                 device: torch.device, total_steps: int) -> None:
        self.config = config
        self.device = device
        self.defense = defense.to(device)
        self.uses_clone = config.lam > 0
        self._fuse = not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in self.defense.modules())
        if self.uses_clone and clone is None:
            raise ValueError("lambda > 0 needs an inner clone")
        self.clone = clone.to(device) if clone is not None else None
        self.opt_d = torch.optim.SGD(self.defense.parameters(), lr=config.lr, momentum=config.momentum,
                                     weight_decay=config.weight_decay)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, cosine_lambda(total_steps))
        fp16 = device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported()
        self.scaler_d = torch.amp.GradScaler("cuda", enabled=fp16)
        self.scaler_s = torch.amp.GradScaler("cuda", enabled=fp16)
        if self.clone is not None:
            self.opt_s = torch.optim.SGD(self.clone.parameters(), lr=config.clone_lr,
                                         momentum=config.clone_momentum, weight_decay=config.clone_weight_decay)
            self.sched_s = torch.optim.lr_scheduler.LambdaLR(self.opt_s, cosine_lambda(total_steps))

    def _amp(self):
        return autocast(self.device, self.config.amp)

    @staticmethod
    def _apply(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params, clip: float | None) -> None:
        if clip:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, clip)
        scaler.step(opt)
        scaler.update()

    # ------------------------------------------------------------------ (a) the clone
    def _clone_update(self, x_aug: torch.Tensor, d_aug: torch.Tensor) -> torch.Tensor:
        """``a_iter`` clone updates towards the fixed targets ``d_aug`` (detached). Returns the first loss."""
        cfg, s = self.config, self.clone
        s.train()
        first = None
        accumulate = cfg.inner_mode == "accumulate"
        if accumulate:
            self.opt_s.zero_grad(set_to_none=True)
        for _ in range(cfg.a_iter):
            with self._amp():
                s_aug = s(x_aug)
            loss = clone_loss(s_aug, d_aug)
            if first is None:
                first = loss.detach()
            if not accumulate:
                self.opt_s.zero_grad(set_to_none=True)
            self.scaler_s.scale(loss).backward()
            if not accumulate:
                self._apply(self.opt_s, self.scaler_s, s.parameters(), cfg.clone_grad_clip)
        if accumulate:
            self._apply(self.opt_s, self.scaler_s, s.parameters(), cfg.clone_grad_clip)
        self.sched_s.step()
        return first

    def clone_step(self, x_aug: torch.Tensor) -> torch.Tensor:
        """Step (a) alone: update ``s`` on ``KL(d(x_aug) || s(x_aug))`` with ``d`` fixed. Returns the loss before."""
        with torch.no_grad(), self._amp():
            self.defense.train()
            d_aug = self.defense(x_aug)
        return self._clone_update(x_aug, d_aug)

    # ------------------------------------------------------------------ (b) the defense
    def _defense_update(self, x: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor,
                        d_aug: torch.Tensor | None, x_aug: torch.Tensor | None,
                        d_x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        cfg, d = self.config, self.defense
        if d_x is None:
            d.train()
            with self._amp():
                d_x = d(x)
        kd = kd_loss(d_x, t_logits, y, temperature=cfg.temperature, alpha=cfg.alpha)
        out = {"kd_loss": kd.detach()}
        loss = kd
        if self.uses_clone and cfg.lam > 0:
            with torch.no_grad(), self._amp():
                self.clone.train()
                s_aug = self.clone(x_aug)
            atk = attacker_term(d_aug, s_aug)
            loss = kd - cfg.lam * atk
            out["attacker_kl"] = atk.detach()
        extra = self.extra_loss()
        if extra is not None:
            loss = loss + extra[0]
            out.update(extra[1])
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler_d.scale(loss).backward()
        self._apply(self.opt_d, self.scaler_d, d.parameters(), cfg.grad_clip)
        self.sched_d.step()
        out["loss"] = loss.detach()
        return out

    def defense_step(self, x: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor,
                     x_aug: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Step (b) alone: one update of ``d`` against the current (fixed) clone."""
        d_aug = None
        if self.uses_clone:
            self.defense.train()
            with self._amp():
                d_aug = self.defense(x_aug)
        return self._defense_update(x, y, t_logits, d_aug, x_aug)

    def extra_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """An extra term added to ``d``'s loss in step (b) and its detached scalars (``None``: none, the default).

        Overridden by the decoy variant (:mod:`misleader.defenses.misleader.decoy`); the faithful trainer adds
        nothing and draws nothing.
        """
        return None

    # ------------------------------------------------------------------ both
    def step(self, x: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor,
             x_aug: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One batch of Algorithm 1: clone update(s), then the defense update.

        Args:
            x: clean batch, float (B, C, H, W) in [0, 1]; y: (B,) labels; t_logits: (B, K) victim logits on x.
            x_aug: strongly augmented attacker batch (B', C, H, W) (unused when ``lambda == 0``).

        Returns:
            Detached scalars: ``loss``, ``kd_loss`` and, with ``lambda > 0``, ``attacker_kl`` (the term in
            ``d``'s loss, after the clone update) and ``clone_kl`` (the clone's loss before its update).
        """
        if not self.uses_clone:
            return self._defense_update(x, y, t_logits, None, None)
        if x_aug is None:
            raise ValueError("lambda > 0: step() needs the augmented attacker batch x_aug")
        self.defense.train()
        d_x = None
        # d is fixed during (a), so one forward serves (a) and (b); without BatchNorm (whose batch
        # statistics would mix the two distributions) the clean and augmented batches share it.
        with self._amp():
            if self._fuse:
                d_x, d_aug = self.defense(torch.cat([x, x_aug])).split([len(x), len(x_aug)])
            else:
                d_aug = self.defense(x_aug)
        clone_kl = self._clone_update(x_aug, d_aug.detach())
        out = self._defense_update(x, y, t_logits, d_aug, x_aug, d_x)
        out["clone_kl"] = clone_kl
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        st = {"defense": self.defense.state_dict(), "opt_d": self.opt_d.state_dict(),
              "sched_d": self.sched_d.state_dict(), "scaler_d": self.scaler_d.state_dict()}
        if self.clone is not None:
            st.update(clone=self.clone.state_dict(), opt_s=self.opt_s.state_dict(), sched_s=self.sched_s.state_dict(),
                      scaler_s=self.scaler_s.state_dict())
        return st

    def load_state_dict(self, st: Mapping[str, Any]) -> None:
        self.defense.load_state_dict(st["defense"])
        self.opt_d.load_state_dict(st["opt_d"])
        self.sched_d.load_state_dict(st["sched_d"])
        self.scaler_d.load_state_dict(st["scaler_d"])
        if self.clone is not None:
            self.clone.load_state_dict(st["clone"])
            self.opt_s.load_state_dict(st["opt_s"])
            self.sched_s.load_state_dict(st["sched_s"])
            self.scaler_s.load_state_dict(st["scaler_s"])


@dataclass
class MemberResult:
    """What :func:`train_member` returns (weights on CPU)."""

    defense_state: dict[str, torch.Tensor]
    clone_state: dict[str, torch.Tensor] | None
    best_val_accuracy: float
    best_epoch: int
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    last_defense_state: dict[str, torch.Tensor] | None = None


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, *, device: torch.device, amp: bool,
            batch_size: int = 2048) -> torch.Tensor:
    """Float32 logits (N, K) on ``device`` of uint8/float images ``x`` (eval mode)."""
    mode = model.training
    model.eval()
    out = []
    for chunk in x.split(batch_size):
        with autocast(device, amp):
            out.append(model(to_unit(chunk.to(device))).float())
    model.train(mode)
    return torch.cat(out)


def _cuda_index(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def resolve_clean_augment(config: MemberConfig, channels: int) -> str:
    if config.clean_augment != "auto":
        return config.clean_augment
    return "weak" if channels == 3 else "none"


class _MemberTask:
    """One epoch of Algorithm 1 over the training split (the :class:`~misleader.training.loop.FitTask` of a member)."""

    def __init__(self, *, trainer: MemberTrainer, teacher: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
                 x_val: torch.Tensor, y_val: torch.Tensor, device: torch.device, generator: torch.Generator) -> None:
        cfg = trainer.config
        self.trainer, self.teacher, self.x_val, self.y_val, self.device = trainer, teacher, x_val, y_val, device
        self.n, bs = len(x_train), cfg.batch_size
        self.steps = self.n // bs if self.n >= bs else 1
        self.bs = bs if self.n >= bs else self.n
        channels, size = int(x_train.shape[1]), int(x_train.shape[-1])
        self.weak = (weak_augmentation(image_size=size).to(device)
                     if resolve_clean_augment(cfg, channels) == "weak" else None)
        self.strong = strong_augmentation(image_size=size, channels=channels, **cfg.strong_augment).to(device)
        # independent streams, so that lambda = 0 consumes exactly what plain KD would
        self.streams = {k: make_generator(derive_seed(generator)) for k in ("clean", "attack", "weak", "strong", "torch")}
        self.x_dev, self.y_dev = x_train.to(device), y_train.to(device)
        self.t_cache = None
        if self.weak is None and cfg.cache_teacher:
            self.t_cache = _logits(teacher, self.x_dev, device=device, amp=cfg.amp)

    def run_epoch(self, epoch: int, *, bar: Any) -> dict[str, Any]:
        trainer, cfg, device, bs, streams = self.trainer, self.trainer.config, self.device, self.bs, self.streams
        # dropout and any other global-RNG user: seeded per epoch from the run's generator
        with torch.random.fork_rng(devices=_cuda_index(device)):
            torch.manual_seed(derive_seed(streams["torch"]))
            perm_c = torch.randperm(self.n, generator=streams["clean"]).to(device)
            perm_a = torch.randperm(self.n, generator=streams["attack"]).to(device) if trainer.uses_clone else None
            sums: dict[str, torch.Tensor] = {}
            for i in range(self.steps):
                idx = perm_c[i * bs:(i + 1) * bs]
                x, y = to_unit(self.x_dev[idx]), self.y_dev[idx]
                if self.weak is not None:
                    x = augment(self.weak, x, generator=streams["weak"])
                if self.t_cache is not None:
                    t_logits = self.t_cache[idx]
                else:
                    with torch.no_grad(), autocast(device, cfg.amp):
                        t_logits = self.teacher(x).float()
                x_aug = None
                if trainer.uses_clone:
                    x_aug = augment(self.strong, to_unit(self.x_dev[perm_a[i * bs:(i + 1) * bs]]),
                                    generator=streams["strong"])
                out = trainer.step(x, y, t_logits, x_aug)
                for k, v in out.items():
                    sums[k] = sums[k] + v if k in sums else v.clone()
                bar.update(1)
        val_acc = accuracy(predict_probs(trainer.defense, self.x_val, device=device, amp=cfg.amp), self.y_val)
        clone_val = (accuracy(predict_probs(trainer.clone, self.x_val, device=device, amp=cfg.amp), self.y_val)
                     if trainer.uses_clone else None)
        means = {k: float(v) / self.steps for k, v in sums.items()}
        row = {"val_accuracy": val_acc, "clone_val_accuracy": clone_val, "kd_loss": means.get("kd_loss"),
               "attacker_kl": means.get("attacker_kl"), "clone_kl": means.get("clone_kl"), "loss": means.get("loss"),
               "lr": trainer.opt_d.param_groups[0]["lr"]}
        row.update({k: v for k, v in means.items() if k not in row})  # a variant's extra terms (none by default)
        return row

    def snapshot(self) -> dict[str, Any]:
        return {"defense": cpu_state(self.trainer.defense), "clone": cpu_state(self.trainer.clone)}

    def state_dict(self) -> dict[str, Any]:
        return {"trainer": self.trainer.state_dict(), "streams": {k: g.get_state() for k, g in self.streams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state["trainer"])
        for k, g in self.streams.items():
            g.set_state(state["streams"][k])


def train_member(
    *,
    config: MemberConfig,
    teacher: nn.Module,
    defense: nn.Module,
    clone: nn.Module | None,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    device: torch.device,
    generator: torch.Generator,
    resume_path: str | Path | None = None,
    settings: dict[str, Any] | None = None,
    desc: str = "member",
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    decoy_bank_dir: str | Path | None = None,
) -> MemberResult:
    """Train one MISLEADER member (Algorithm 1) and select it on the validation split.

    Args:
        config: the member's settings.
        teacher: the victim (frozen, eval mode), input in [0, 1], logits out.
        defense, clone: freshly initialised member ``d`` and inner clone ``s`` (``clone`` may be
            ``None`` when ``config.lam == 0``).
        x_train, y_train: the defender's training split, uint8 (N, C, H, W) and int64 (N,).
        x_val, y_val: the validation split (model selection and the per-epoch record only).
        device: training device.
        generator: seeds everything random in the run (shuffles, augmentations, dropout).
        resume_path: per-epoch resume state (``None``: not resumable).
        settings: what else defines the run besides ``config`` (e.g. the seed and the victim's
            sha256); a resume state written with another ``config`` or ``settings`` is refused.
        on_epoch: called with each history row.
        decoy_bank_dir: where the decoy variant's stored banks are (its ``extra_banks``; none by default).

    Returns:
        :class:`MemberResult`: the best-validation member and the clone of that epoch (and the last
        epoch's member), and one
        history row per epoch (``val_accuracy``, ``clone_val_accuracy``, ``kd_loss``,
        ``attacker_kl``, ``clone_kl``, ``loss``, ``lr``, ``seconds``).
    """
    if len(x_train) != len(y_train) or len(x_train) == 0:
        raise ValueError(f"x_train and y_train must be non-empty and of equal length, got {len(x_train)}, "
                         f"{len(y_train)}")
    cfg = config
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    n, bs = len(x_train), cfg.batch_size
    steps = n // bs if n >= bs else 1
    common = {"config": cfg, "defense": defense, "clone": clone if cfg.lam > 0 else None, "device": device,
              "total_steps": cfg.epochs * steps}
    if cfg.decoy:  # the decoy variant (issue 11); the faithful path below is unchanged
        from misleader.defenses.misleader.decoy import make_decoy_trainer

        trainer = make_decoy_trainer(decoy=cfg.decoy, teacher=teacher, input_shape=tuple(x_train.shape[1:]),
                                     bank_dir=decoy_bank_dir,
                                     generator=make_generator(derive_seed(generator)), **common)
    else:
        trainer = MemberTrainer(**common)
    task = _MemberTask(trainer=trainer, teacher=teacher, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val,
                       device=device, generator=generator)
    res = fit(task, epochs=cfg.epochs, steps_per_epoch=task.steps, resume_path=resume_path,
              settings={"config": cfg.to_dict(), **(settings or {})}, patience=cfg.effective_patience, desc=desc,
              on_epoch=on_epoch)
    return MemberResult(defense_state=res.best["defense"], clone_state=res.best["clone"],
                        best_val_accuracy=res.best_val_accuracy, best_epoch=res.best_epoch, epochs_run=res.epochs_run,
                        history=res.history, seconds=res.seconds, last_defense_state=cpu_state(trainer.defense))
