"""Batched evaluation of models and oracles on tensors (harness-side; never counted as queries)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from misleader.data.loader import to_unit
from misleader.utils import autocast


@torch.inference_mode()
def predict_probs(models: nn.Module | Sequence[nn.Module], x: torch.Tensor, *, batch_size: int = 1024,
                  device: torch.device | str = "cpu", amp: bool = True) -> torch.Tensor:
    """Softmax probabilities (N, K) on CPU; a list of models gives their soft vote (mean of softmaxes).

    Args:
        models: one classifier or a list of them (all in [0, 1] input space).
        x: uint8 (N, C, H, W) or float in [0, 1].
    """
    device = torch.device(device)
    ms = [models] if isinstance(models, nn.Module) else list(models)
    modes = [m.training for m in ms]
    for m in ms:
        m.eval()
    out = []
    for chunk in x.split(batch_size):
        xb = to_unit(chunk.to(device, non_blocking=True))
        p = None
        for m in ms:
            with autocast(device, amp):
                logits = m(xb)
            q = torch.softmax(logits.float(), dim=1)
            p = q if p is None else p + q
        out.append((p / len(ms)).cpu())
    for m, mode in zip(ms, modes):
        m.train(mode)
    return torch.cat(out)


def query_all(oracle, x: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:  # noqa: ANN001
    """Answer every row of ``x`` (uint8 or float) through ``oracle`` in chunks; returns CPU tensors."""
    return torch.cat([oracle.query(to_unit(c)).cpu() for c in x.split(batch_size)])
