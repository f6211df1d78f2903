"""Batched evaluation of models, oracles and target folders on tensors (harness-side; never counted).

Everything here measures in float32 (no autocast by default): the published utility, fidelity and L1
numbers must not depend on the accelerator's reduced precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from misleader.data.loader import to_unit
from misleader.utils import autocast


@torch.inference_mode()
def predict_probs(models: nn.Module | Sequence[nn.Module], x: torch.Tensor, *, batch_size: int = 1024,
                  device: torch.device | str = "cpu", amp: bool = False,
                  weights: Sequence[float] | None = None) -> torch.Tensor:
    """Softmax probabilities (N, K) on CPU; a list of models gives their soft vote.

    Args:
        models: one classifier or a list of them (all in [0, 1] input space).
        x: uint8 (N, C, H, W) or float in [0, 1].
        amp: autocast on CUDA (for training-time monitoring only; measurements use the float32 default).
        weights: soft-vote weights (normalised to sum 1; default equal: the plain mean of softmaxes).
    """
    device = torch.device(device)
    ms = [models] if isinstance(models, nn.Module) else list(models)
    w = None
    if weights is not None:
        from misleader.oracle.backends import normalised_weights

        w = normalised_weights(list(weights), len(ms)).tolist()
    modes = [m.training for m in ms]
    for m in ms:
        m.eval()
    out = []
    for chunk in x.split(batch_size):
        xb = to_unit(chunk.to(device, non_blocking=True))
        p = None
        for i, m in enumerate(ms):
            with autocast(device, amp):
                logits = m(xb)
            q = torch.softmax(logits.float(), dim=1)
            q = q if w is None else q * w[i]
            p = q if p is None else p + q
        out.append((p if w is not None else p / len(ms)).cpu())
    for m, mode in zip(ms, modes):
        m.train(mode)
    return torch.cat(out)


def query_all(oracle, x: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:  # noqa: ANN001
    """Answer every row of ``x`` (uint8 or float) through ``oracle`` in chunks; returns CPU tensors."""
    return torch.cat([oracle.query(to_unit(c)).cpu() for c in x.split(batch_size)])


def evaluate_target(*, target: str | Path, victim: str | Path, x_test: torch.Tensor, y_test: torch.Tensor,
                    device: torch.device | str = "cpu") -> dict[str, Any]:
    """The whole served pipeline of ``target`` against ``victim`` on the test set, in float32.

    Both folders are opened with :func:`misleader.oracle.load_oracle` (unbudgeted, harness-side), so the
    manifest's weights and every step count exactly as an attacker would see them.

    Args:
        x_test: uint8 (N, C, H, W) test images; y_test: int64 (N,).

    Returns:
        ``test_accuracy``, ``victim_test_accuracy``, ``fidelity`` (top-1 agreement with the victim) and
        ``mean_l1_to_victim`` (mean over rows of ``||p_target - p_victim||_1``).
    """
    from misleader.metrics import accuracy, fidelity, mean_l1
    from misleader.oracle.load import load_oracle

    pt = query_all(load_oracle(target, device=device), x_test)
    pv = query_all(load_oracle(victim, device=device), x_test)
    return {"test_accuracy": accuracy(pt, y_test), "victim_test_accuracy": accuracy(pv, y_test),
            "fidelity": fidelity(pt, pv), "mean_l1_to_victim": mean_l1(pt, pv)}


__all__ = ["evaluate_target", "predict_probs", "query_all"]
