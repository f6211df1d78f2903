"""``load_oracle(DIR)``: open a victim folder or a defense folder (format 1 or 2) as an oracle.

Every folder is served by a :class:`~misleader.oracle.pipeline.Pipeline` read by
:func:`~misleader.oracle.manifest.read_target`: a victim folder is the one-step pipeline ``model``,
a format-1 folder the ``ensemble`` backend over its members, a format-2 folder its ``steps``.

:func:`open_accounted` is the harness's entry: it also returns the oracle's
:class:`~misleader.oracle.base.Accountant`, the only handle on the true query count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from misleader.oracle.base import Accountant, Oracle, OutputMode, check_budget
from misleader.oracle.manifest import read_target
from misleader.utils import resolve_device


def describe_target(path: str | Path) -> dict[str, Any]:
    """Metadata of a victim or defense folder: ``kind``, ``dataset``, ``num_classes``, ``input_shape``, ..."""
    return read_target(path).meta


def public_meta(path: str | Path) -> dict[str, Any]:
    """``{dataset, input_shape, num_classes}`` of a target: all an attacker's pool choice may see."""
    return read_target(path).public_meta()


def load_members(path: str | Path, *, device: torch.device | str = "cpu") -> list[torch.nn.Module]:
    """The models of a target folder (for harness-side inspection, never for attacks)."""
    from misleader.oracle.pipeline import model_loader

    t = read_target(path)
    load = model_loader(t, device=torch.device(device))
    return [load(n) for n in t.models]


def open_accounted(path: str | Path, *, output: OutputMode = "probs", budget: int | None = None,
                   device: str | torch.device = "cpu", trace: bool = False) -> tuple[Oracle, Accountant]:
    """Open ``path`` as an oracle and return it with its accountant (for the attack harness only).

    Args:
        path: folder written by ``train-victim`` or ``defend``.
        output: ``"probs"`` or ``"labels"``.
        budget: query budget, a non-negative int (``None``: unlimited).
        device: where the models run (``auto``, ``cpu``, ``cuda``).
        trace: run the models as ``torch.jit.trace`` recordings where they give the same answers
            (:func:`misleader.oracle.pipeline.traced`; the gateway's choice).
    """
    import misleader.defenses  # noqa: F401  (registers every defense's steps)
    from misleader.oracle.pipeline import PipelineOracle, build_pipeline

    acct = Accountant(check_budget(budget))
    dev = resolve_device(device)
    target = read_target(path)
    pipeline = build_pipeline(target, device=dev, trace=trace)
    oracle = PipelineOracle(pipeline, num_classes=target.num_classes, input_shape=target.input_shape,
                            output=output, device=dev, accountant=acct)
    return oracle, acct


def load_oracle(path: str | Path, *, output: OutputMode = "probs", budget: int | None = None,
                device: str | torch.device = "cpu") -> Oracle:
    """Open ``path`` (victim or defense folder) as an oracle (``budget``, count: read-only).

    Args:
        path: folder written by ``train-victim`` or ``defend``.
        output: ``"probs"`` or ``"labels"``.
        budget: query budget, a non-negative int (``None``: unlimited).
        device: where the model runs (``auto``, ``cpu``, ``cuda``).
    """
    return open_accounted(path, output=output, budget=budget, device=device)[0]


__all__ = ["describe_target", "load_members", "load_oracle", "open_accounted", "public_meta"]
