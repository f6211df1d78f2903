"""The served model: a victim or defense folder opened once, answered under a lock off the event loop."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import torch

from misleader.oracle.base import OutputMode


class ServedModel:
    """A target folder as the gateway serves it.

    Args:
        folder: victim or defense folder.
        output: ``probs`` or ``labels`` (what every client gets).
        device: where the model runs.
    """

    def __init__(self, folder: str | Path, *, output: OutputMode = "probs", device: str = "cpu") -> None:
        from misleader.oracle.load import open_accounted
        from misleader.oracle.manifest import read_target

        target = read_target(folder)
        self.folder = target.folder
        self.meta = target.meta
        self.input_shape = tuple(target.input_shape)
        self.num_classes = int(target.num_classes)
        self.output = output
        self._oracle, self._acct = open_accounted(folder, output=output, budget=None, device=device)
        self._lock = threading.Lock()  # stochastic steps share one generator: one batch at a time
        manifest = self.folder / ("manifest.json" if (self.folder / "manifest.json").exists() else "model.json")
        self.fingerprint = hashlib.sha256(manifest.read_bytes()).hexdigest()

    def validate(self, x: torch.Tensor) -> None:
        """``ValueError`` naming the problem when ``x`` is not a (N, *input_shape) batch in [0, 1]."""
        self._oracle.validate(x)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N, *input_shape) -> (N, K) float32 probabilities or (N,) int64 labels. Blocking."""
        with self._lock:
            return self._oracle.query(x)

    @property
    def rows_answered(self) -> int:
        return self._acct.used

    def info(self, *, max_rows: int, pow_enabled: bool) -> dict[str, Any]:
        """What ``GET /v1/model`` shows: public metadata and the pipeline summary (no secrets, no weights)."""
        return {"dataset": self.meta.get("dataset"), "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "class_names": self.meta.get("class_names"),
                "output": self.output, "kind": self.meta.get("kind", "victim"), "defense": self.meta.get("defense"),
                "pipeline": self._oracle.describe(), "split": self.meta.get("split"), "max_rows": max_rows,
                "pow": pow_enabled, "fingerprint": self.fingerprint}


__all__ = ["ServedModel"]
