"""The query interface: the only thing an attack ever sees.

An :class:`Oracle` answers ``query(x)`` for a float batch in [0, 1] of shape (N, *input_shape)
with (N, K) probabilities or (N,) int64 labels. It counts one query per row, checks the budget
*before* evaluating (raising :class:`~misleader.errors.QueryBudgetExceeded`, answering nothing
partial), never exposes the model, logits or gradients, and evaluates under
``torch.inference_mode()``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from misleader.errors import QueryBudgetExceeded
from misleader.utils import autocast

OutputMode = Literal["probs", "labels"]
OUTPUT_MODES: tuple[str, ...] = ("probs", "labels")


class Oracle(ABC):
    """Base class: validation, counting, budget, output mode. Subclasses implement :meth:`_probs`.

    Args:
        num_classes: K.
        input_shape: (C, H, W) expected for every row.
        output: ``"probs"`` ((N, K) float32 on the simplex) or ``"labels"`` ((N,) int64 top-1).
        budget: maximum number of rows ever answered (``None``: unlimited).
        batch_size: evaluation chunk size (memory bound only; results do not depend on it).
        on_query: optional callback ``fn(n_rows)`` called after each answered batch (logging, PoW).

    Attributes:
        queries_used: rows answered so far.
        remaining: ``budget - queries_used`` (``None`` when unlimited).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: Sequence[int],
        output: OutputMode = "probs",
        budget: int | None = None,
        batch_size: int = 1024,
        on_query: Callable[[int], None] | None = None,
    ) -> None:
        if output not in OUTPUT_MODES:
            raise ValueError(f"output must be one of {OUTPUT_MODES}, got {output!r}")
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0 or None, got {budget}")
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.output: OutputMode = output
        self.budget = budget
        self.batch_size = int(batch_size)
        self.on_query = on_query
        self._used = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ accounting
    @property
    def queries_used(self) -> int:
        return self._used

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self._used

    def reset_count(self) -> None:
        """Forget the rows answered so far (used by harnesses between runs, never by attacks)."""
        self._used = 0

    # ------------------------------------------------------------------ the query
    def validate(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the problem when ``x`` is not a valid batch."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"query expects a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"query expects a floating-point tensor in [0, 1], got dtype {x.dtype}")
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"query expects shape (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("query expects at least one row, got an empty batch")
        x = x.detach()
        if not torch.isfinite(x).all():
            raise ValueError("query input contains NaN or inf")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"query input must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Answer a batch. Shape: (N, C, H, W) in [0, 1] -> (N, K) probabilities or (N,) labels.

        Raises:
            ValueError: wrong type, dtype, shape, NaN/inf or values outside [0, 1].
            QueryBudgetExceeded: ``N`` exceeds :attr:`remaining` (nothing is evaluated or counted).
        """
        self.validate(x)
        n = int(x.shape[0])
        with self._lock:
            if self.budget is not None and self._used + n > self.budget:
                raise QueryBudgetExceeded(
                    f"query of {n} rows refused: {self._used} of the budget of {self.budget} already used "
                    f"({self.budget - self._used} remaining)"
                )
            self._used += n
        with torch.inference_mode():
            probs = torch.cat([self._probs(chunk) for chunk in x.detach().split(self.batch_size)])
            out = probs.argmax(dim=1) if self.output == "labels" else probs.float()
        if self.on_query is not None:
            self.on_query(n)
        # leave inference mode: callers may use the answer as a training target
        return out.clone().to(x.device)

    __call__ = query

    @abstractmethod
    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, K) probabilities (rows sum to 1). Runs in inference mode."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_classes={self.num_classes}, input_shape={self.input_shape}, "
                f"output={self.output!r}, queries_used={self._used}, budget={self.budget})")


class ModelOracle(Oracle):
    """An oracle over one classifier (``model(x) -> logits``), answering its softmax.

    Answers are computed in float32 by default (``amp=False``): reduced-precision answers would swamp
    the epsilon = 1e-3 finite differences of zeroth-order attacks such as DFME on a GPU.

    The module is held privately; it is put in eval mode and never handed out.
    """

    def __init__(self, model: nn.Module, *, num_classes: int, input_shape: Sequence[int],
                 device: torch.device | str = "cpu", amp: bool = False, **kwargs) -> None:
        super().__init__(num_classes=num_classes, input_shape=input_shape, **kwargs)
        self.__device = torch.device(device)
        self.__model = model.to(self.__device).eval()
        self.__amp = amp

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.__device, non_blocking=True).float()
        with autocast(self.__device, self.__amp):
            logits = self.__model(x)
        return torch.softmax(logits.float(), dim=1)


class EnsembleOracle(Oracle):
    """Soft voting: the (weighted) mean of the members' softmax probabilities.

    Args:
        members: classifiers returning logits (N, K).
        weights: optional non-negative weights (normalised to sum 1); equal by default, as the
            MISLEADER authors' ``SoftVotingEnsemble``.
    """

    def __init__(self, members: Sequence[nn.Module], *, num_classes: int, input_shape: Sequence[int],
                 weights: Sequence[float] | None = None, device: torch.device | str = "cpu", amp: bool = False,
                 **kwargs) -> None:
        super().__init__(num_classes=num_classes, input_shape=input_shape, **kwargs)
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.__device = torch.device(device)
        self.__members = [m.to(self.__device).eval() for m in members]
        w = torch.ones(len(members)) if weights is None else torch.tensor(list(weights), dtype=torch.float32)
        if len(w) != len(members) or (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be non-negative, one per member, not all zero")
        self.__weights = (w / w.sum()).to(self.__device)
        self.__amp = amp

    @property
    def num_members(self) -> int:
        return len(self.__members)

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.__device, non_blocking=True).float()
        out = None
        for w, m in zip(self.__weights, self.__members):
            with autocast(self.__device, self.__amp):
                logits = m(x)
            p = torch.softmax(logits.float(), dim=1) * w
            out = p if out is None else out + p
        return out


def soft_vote(logits: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Mean of softmaxes of a list of (N, K) logits (weighted if ``weights``). Differentiable."""
    probs = torch.stack([torch.softmax(l.float(), dim=1) for l in logits])  # (M, N, K)
    if weights is None:
        return probs.mean(0)
    w = torch.tensor(list(weights), dtype=probs.dtype, device=probs.device)
    return (probs * (w / w.sum()).view(-1, 1, 1)).sum(0)
