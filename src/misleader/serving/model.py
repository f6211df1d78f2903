"""The served model: a victim or defense folder opened once, answered off the event loop.

Concurrent requests are answered together (*request combining*, a form of dynamic batching): a request
thread queues its batch, then waits for the model lock; whichever thread holds the lock takes every
batch queued so far (up to ``max_batch_rows`` rows), answers them with one forward pass and hands each
request its own rows. A request that arrives while the model is busy is thus answered by the next pass
together with the others that arrived meanwhile, instead of one pass per request; a lone request is
answered alone, as before. Each row's answer does not depend on the other rows of its pass (the served
pipelines are per-row functions; a stochastic step draws its noise per row from the shared generator, so
only which draw a row gets depends on the arrival order, as it already did between concurrent requests).
``max_batch_rows=0`` turns combining off (one pass per request).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from misleader.oracle.base import OutputMode, plain_batch


#: rows answered by one combined forward pass at most (a pass takes whole requests, so one request larger
#: than this still goes alone). Small: a CPU forward's cost per row is lowest near 256 rows and grows beyond
#: (MNIST LeNet5, 1 thread: 2.25 ms per 64 rows alone, 1.88 in passes of 256, 3.59 in passes of 1,024)
DEFAULT_MAX_BATCH_ROWS = 256


@dataclass(eq=False)
class _Pending:
    """One request's batch waiting for a combined pass, and what the pass gave it."""

    x: torch.Tensor
    out: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


class ServedModel:
    """A target folder as the gateway serves it.

    Args:
        folder: victim or defense folder.
        output: ``probs`` or ``labels`` (what every client gets).
        device: where the model runs.
        max_batch_rows: combine concurrent requests into passes of at most this many rows (0: one pass
            per request); see the module docstring.
    """

    def __init__(self, folder: str | Path, *, output: OutputMode = "probs", device: str = "cpu",
                 max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS) -> None:
        from misleader.oracle.load import open_accounted
        from misleader.oracle.manifest import read_target

        target = read_target(folder)
        self.folder = target.folder
        self.meta = target.meta
        self.input_shape = tuple(target.input_shape)
        self.num_classes = int(target.num_classes)
        self.output = output
        # traced models: a forward pass without the GIL between its operations (the same answers; see
        # misleader.oracle.pipeline.traced), so that request threads do not hold up the model's passes
        self._oracle, self._acct = open_accounted(folder, output=output, budget=None, device=device, trace=True)
        self._lock = threading.Lock()  # stochastic steps share one generator: one pass at a time
        self._queue_lock = threading.Lock()
        self._queue: list[_Pending] = []
        self.max_batch_rows = int(max_batch_rows)
        self.passes = 0  # forward passes run (<= requests answered; fewer when requests were combined)
        manifest = self.folder / ("manifest.json" if (self.folder / "manifest.json").exists() else "model.json")
        self.fingerprint = hashlib.sha256(manifest.read_bytes()).hexdigest()

    def validate(self, x: torch.Tensor) -> None:
        """``ValueError`` naming the problem when ``x`` is not a (N, *input_shape) batch in [0, 1]."""
        self._oracle.validate(x)

    def check(self, x: torch.Tensor) -> torch.Tensor:
        """The oracle's input check: the plain, detached, checked copy of ``x`` that :meth:`predict` answers
        with ``checked=True``; ``ValueError`` naming the problem when ``x`` is not a (N, *input_shape) batch in
        [0, 1]."""
        return plain_batch(x, self.input_shape)

    def predict(self, x: torch.Tensor, *, checked: bool = False) -> torch.Tensor:
        """(N, *input_shape) -> (N, K) float32 probabilities or (N,) int64 labels. Blocking, thread-safe.

        ``checked``: ``x`` is :meth:`check`'s result (or a row subset of it), so it is not checked again. The
        check runs in the caller's thread either way, not under the model's lock.

        Raises what the model raised for this request's pass (every request of a failed pass gets the error).
        """
        if not checked:
            x = plain_batch(x, self.input_shape)
        if self.max_batch_rows <= 0:
            with self._lock:
                self.passes += 1
                return self._oracle._answer_validated(x)
        me = _Pending(x)
        with self._queue_lock:
            self._queue.append(me)
        while True:
            with self._lock:
                if me.done:
                    break
                self._answer_queued()
            # (not reached with ``me`` pending: the pass above took the queue's head, and ``me`` is in it
            # unless earlier requests filled max_batch_rows; then the next pass takes it)
        if me.error is not None:
            raise me.error
        assert me.out is not None
        return me.out

    def _answer_queued(self) -> None:
        """Take queued requests (whole, in arrival order, up to ``max_batch_rows`` rows; at least one) and
        answer them with one pass. Called with ``self._lock`` held."""
        with self._queue_lock:
            take, rows = 0, 0
            for p in self._queue:
                if take and rows + len(p.x) > self.max_batch_rows:
                    break
                take, rows = take + 1, rows + len(p.x)
            batch, self._queue = self._queue[:take], self._queue[take:]
        if not batch:
            return
        self.passes += 1
        try:
            out = self._oracle._answer_validated(batch[0].x if len(batch) == 1 else torch.cat([p.x for p in batch]))
            parts = out.split([len(p.x) for p in batch]) if len(batch) > 1 else (out,)
            for p, o in zip(batch, parts):
                p.out = o
        except BaseException as exc:  # noqa: BLE001 - handed to every request of the pass
            for p in batch:
                p.error = exc
        for p in batch:
            p.done = True

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
