"""``load_oracle(DIR)``: open a victim folder or a defense folder as an oracle.

* victim folder: ``model.json`` + ``model.safetensors`` -> :class:`ModelOracle`.
* defense folder: ``manifest.json`` listing member checkpoints (paths relative to the folder) and
  how to combine them (``"combine": "mean_softmax"``, optional ``"weights"``) -> :class:`EnsembleOracle`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from misleader.errors import MisleaderError
from misleader.oracle.base import EnsembleOracle, ModelOracle, Oracle, OutputMode
from misleader.training.checkpoint import load_model
from misleader.utils import read_json, resolve_device


def describe_target(path: str | Path) -> dict[str, Any]:
    """Metadata of a victim or defense folder: ``kind``, ``dataset``, ``num_classes``, ``input_shape``, ..."""
    path = Path(path)
    if (path / "manifest.json").exists():
        m = read_json(path / "manifest.json")
        m.setdefault("kind", "defense")
        return m
    if (path / "model.json").exists():
        m = read_json(path / "model.json")
        m["kind"] = "victim"
        return m
    raise MisleaderError(f"{path} is neither a victim folder (model.json) nor a defense folder (manifest.json): "
                         "pass a folder written by `misleader train-victim` or `misleader defend`")


def load_members(path: str | Path, *, device: torch.device | str = "cpu") -> list[torch.nn.Module]:
    """The member models of a defense folder (for harness-side evaluation, never for attacks)."""
    path = Path(path)
    manifest = describe_target(path)
    if manifest["kind"] == "victim":
        return [load_model(path, device=device)[0]]
    return [load_model(path / m["checkpoint"], device=device)[0] for m in manifest["members"]]


def load_oracle(path: str | Path, *, output: OutputMode = "probs", budget: int | None = None,
                device: str | torch.device = "cpu") -> Oracle:
    """Open ``path`` (victim or defense folder) as an oracle.

    Args:
        path: folder written by ``train-victim`` or ``defend``.
        output: ``"probs"`` or ``"labels"``.
        budget: query budget (``None``: unlimited).
        device: where the model runs (``auto``, ``cpu``, ``cuda``).
    """
    path = Path(path)
    dev = resolve_device(device)
    meta = describe_target(path)
    shape, k = meta["input_shape"], int(meta["num_classes"])
    if meta["kind"] == "victim":
        model, _ = load_model(path, device=dev)
        return ModelOracle(model, num_classes=k, input_shape=shape, output=output, budget=budget, device=dev)
    combine = meta.get("combine", "mean_softmax")
    if combine != "mean_softmax":
        raise MisleaderError(f"{path}/manifest.json: unknown combine {combine!r} (this version knows mean_softmax)")
    members = load_members(path, device=dev)
    return EnsembleOracle(members, num_classes=k, input_shape=shape, weights=meta.get("weights"), output=output,
                          budget=budget, device=dev)
