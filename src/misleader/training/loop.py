"""The one resumable fit loop: epochs, validation-based selection, early stopping, resume state.

Victim training (:func:`misleader.training.train.train_classifier`) and MISLEADER member training
(:func:`misleader.defenses.misleader.trainer.train_member`) both run their epochs through
:func:`fit`; they differ only in what an epoch does (:class:`FitTask`).

After every epoch the loop keeps the snapshot with the best validation accuracy (strictly better
than all earlier epochs), stops after ``patience`` epochs without improvement (0: never early), and
writes the whole state (task state, best snapshot, history, counters and the run's ``settings``)
atomically to ``resume_path`` (:mod:`misleader.training.resume`). A later call with the same
``resume_path`` continues after the last finished epoch, and only when the stored settings equal
the requested ones; an unreadable file or other settings is a :class:`MisleaderError`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from misleader.errors import MisleaderError
from misleader.training.resume import load_resume_state, save_resume_state
from misleader.utils import progress

log = logging.getLogger(__name__)


class FitTask(Protocol):
    """What :func:`fit` needs from a trainer."""

    def run_epoch(self, epoch: int, *, bar: Any) -> dict[str, Any]:
        """Train epoch ``epoch`` (0-based), then validate; return the history fields of the epoch
        (must include ``val_accuracy``; ``epoch`` and ``seconds`` are added by the loop). Call
        ``bar.update(1)`` per step."""

    def snapshot(self) -> dict[str, Any]:
        """What to keep when the epoch is the best so far (CPU copies of weights)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after this epoch (weights, optimisers, generators)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


@dataclass
class FitResult:
    """The outcome of :func:`fit`: the best snapshot and one history row per epoch run."""

    best: dict[str, Any]
    best_val_accuracy: float
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def epochs_run(self) -> int:
        return len(self.history)


def cpu_state(model: nn.Module | None) -> dict[str, torch.Tensor] | None:
    """A CPU copy of ``model``'s state dict (``None`` for no model): what a snapshot keeps."""
    return None if model is None else {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _normal(settings: dict[str, Any] | None) -> Any:
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def fit(
    task: FitTask,
    *,
    epochs: int,
    steps_per_epoch: int,
    resume_path: str | Path | None = None,
    settings: dict[str, Any] | None = None,
    patience: int = 0,
    desc: str = "train",
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    select_best: bool = True,
) -> FitResult:
    """Run ``task`` for up to ``epochs`` epochs, keeping the best validation snapshot.

    Args:
        task: the trainer (:class:`FitTask`).
        epochs: the number of epochs of the whole run (resumed epochs included).
        steps_per_epoch: for the progress bar.
        resume_path: the resume file (``None``: not resumable).
        settings: JSON-serialisable settings of the run; a resume file written with other settings
            is refused.
        patience: epochs without validation improvement before stopping (0: never stop early).
        on_epoch: called with each history row, before the row is saved in the resume state.
        select_best: ``False``: keep the last epoch's snapshot (tasks without a validation accuracy, e.g.
            DNF's exit heads, whose thresholds are calibrated afterwards); ``val_accuracy`` may then be absent.

    Returns:
        :class:`FitResult`.

    Raises:
        MisleaderError: ``resume_path`` is unreadable or was written with other settings.
    """
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    start_epoch, history, seconds = 0, [], 0.0
    best_acc, best_epoch, since_best = -1.0, 0, 0
    best = task.snapshot()
    state = load_resume_state(resume_path) if resume_path is not None else None
    if state is not None:
        if _normal(state.get("settings")) != _normal(settings):
            raise MisleaderError(f"resume state {resume_path} was written by a run with other settings: pass --force "
                                 "to start over, or re-run with the same settings to resume")
        task.load_state_dict(state["task"])
        start_epoch, history, seconds = int(state["epoch"]), list(state["history"]), float(state["seconds"])
        best_acc, best_epoch, since_best = float(state["best_acc"]), int(state["best_epoch"]), int(state["since_best"])
        best = state["best"]
        log.info("resuming %s from epoch %d (best val acc %.4f)", desc, start_epoch, best_acc)

    def done(epoch: int) -> bool:
        return epoch >= epochs or bool(patience and since_best >= patience)

    bar = progress(total=epochs * steps_per_epoch, desc=desc, unit="step")
    bar.update(start_epoch * steps_per_epoch)
    epoch = start_epoch
    while not done(epoch):
        t0 = time.perf_counter()
        fields = task.run_epoch(epoch, bar=bar)
        seconds += time.perf_counter() - t0
        epoch += 1
        row = {"epoch": epoch, **fields, "seconds": seconds}
        history.append(row)
        val_acc = float(row.get("val_accuracy", -1.0)) if not select_best else float(row["val_accuracy"])
        bar.set_postfix(val=f"{val_acc:.4f}")
        log.info("%s epoch %d/%d %s", desc, epoch, epochs,
                 " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()))
        if on_epoch is not None:
            on_epoch(row)
        if val_acc > best_acc or not select_best:
            best_acc, best_epoch, since_best = val_acc, epoch, 0
            best = task.snapshot()
        else:
            since_best += 1
        if done(epoch) and epoch < epochs:
            log.info("%s: no validation improvement for %d epochs, stopping at epoch %d", desc, since_best, epoch)
        if resume_path is not None:
            save_resume_state(resume_path, {
                "settings": settings, "task": task.state_dict(), "epoch": epoch, "history": history,
                "seconds": seconds, "best_acc": best_acc, "best_epoch": best_epoch, "since_best": since_best,
                "best": best,
            })
    bar.close()
    return FitResult(best=best, best_val_accuracy=best_acc, best_epoch=best_epoch, history=history, seconds=seconds)


__all__ = ["FitResult", "FitTask", "cpu_state", "fit"]
