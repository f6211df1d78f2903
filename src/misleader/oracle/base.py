"""The query interface: the only thing an attack ever sees.

An :class:`Oracle` answers ``query(x)`` for a float batch in [0, 1] of shape (N, *input_shape)
with (N, K) probabilities or (N,) int64 labels. It counts one query per row, reserves the rows
*before* evaluating (raising :class:`~misleader.errors.QueryBudgetExceeded`, answering nothing
partial) and refunds them if the evaluation itself fails, never exposes the model, logits or
gradients, and evaluates under ``torch.inference_mode()``.

**Sealed.** The count lives in a private :class:`Accountant`; the oracle's ``budget``,
``queries_used`` and ``remaining`` are read-only, there is no ``reset_count`` and no settable
``on_query``. The attack harness opens its target with
:func:`misleader.oracle.load.open_accounted`, which hands it the accountant (the only handle on the
true count, and where its progress hook goes), and gives the attack a :class:`SealedOracle` view
(``input_shape``, ``num_classes``, ``output``, ``budget``, ``queries_used``, ``remaining`` /
``queries_left`` reads and ``query`` / ``__call__``; nothing settable).
"""

from __future__ import annotations

import numbers
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from misleader.errors import QueryBudgetExceeded

OutputMode = Literal["probs", "labels"]
OUTPUT_MODES: tuple[str, ...] = ("probs", "labels")

#: attribute names an oracle refuses to have (re)assigned from outside
_SEALED_NAMES = frozenset({"budget", "on_query", "queries_used", "remaining", "queries_left", "reset_count",
                           "num_classes", "input_shape", "output", "batch_size", "query", "validate",
                           "accountant"})


def check_budget(budget: Any) -> int | None:
    """``budget`` as a non-negative int, or ``None`` (unlimited); ``ValueError`` otherwise (2.5, True, -1).

    Example:
        >>> check_budget(10), check_budget(None)
        (10, None)
    """
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise ValueError(f"budget must be a non-negative int or None, got {budget!r}")
    if int(budget) < 0:
        raise ValueError(f"budget must be >= 0 or None, got {budget}")
    return int(budget)


class Accountant:
    """The true query count of one oracle and its budget: held by the oracle and by the harness only.

    Args:
        budget: maximum number of rows ever answered (``None``: unlimited).

    Attributes:
        on_query: optional hook ``fn(n_rows)`` after each answered batch (progress bar, logging, PoW).
    """

    def __init__(self, budget: int | None = None) -> None:
        self.__budget = check_budget(budget)
        self.__used = 0
        self.__lock = threading.Lock()
        self.on_query: Callable[[int], None] | None = None
        #: optional hook ``fn(x (N, C, H, W), probs (N, K), seconds)`` after each answered batch: the rows,
        #: the defender-side probabilities (also in labels mode) and the seconds the oracle spent on them
        #: (proof-of-work metering, detectors)
        self.on_answer: Callable[[torch.Tensor, torch.Tensor, float], None] | None = None

    @property
    def budget(self) -> int | None:
        return self.__budget

    @property
    def used(self) -> int:
        return self.__used

    @property
    def remaining(self) -> int | None:
        return None if self.__budget is None else self.__budget - self.__used

    def reserve(self, n: int) -> None:
        """Count ``n`` rows before evaluating them (raise ``QueryBudgetExceeded``, counting nothing)."""
        with self.__lock:
            if self.__budget is not None and self.__used + n > self.__budget:
                raise QueryBudgetExceeded(
                    f"query of {n} rows refused: {self.__used} of the budget of {self.__budget} already used "
                    f"({self.__budget - self.__used} remaining)")
            self.__used += n

    def refund(self, n: int) -> None:
        """Give back ``n`` reserved rows whose evaluation failed (nothing was answered)."""
        with self.__lock:
            self.__used -= n

    def answered(self, n: int, *, x: torch.Tensor | None = None, probs: torch.Tensor | None = None,
                 seconds: float = 0.0) -> None:
        """Called by the oracle after answering ``n`` rows (``x``/``probs`` for :attr:`on_answer`)."""
        if self.on_answer is not None and x is not None and probs is not None:
            self.on_answer(x, probs, seconds)
        if self.on_query is not None:
            self.on_query(n)


def plain_batch(x: Any, input_shape: Sequence[int]) -> torch.Tensor:
    """Validate a query batch and return it as a plain detached ``torch.Tensor`` copy.

    Checks run on the plain copy (a ``torch.Tensor`` subclass cannot fake ``min``/``max``), and that copy
    is what gets evaluated. Shape: (N, *input_shape) float in [0, 1].

    Raises:
        ValueError: not a tensor, meta/sparse/non-float tensor, wrong shape, empty, NaN/inf, outside [0, 1].
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"query expects a torch.Tensor, got {type(x).__name__}")
    try:
        x = torch.Tensor.as_subclass(x, torch.Tensor)
    except (RuntimeError, NotImplementedError, TypeError):
        raise ValueError("query expects a dense tensor with data (not sparse, not meta): call .to_dense()") from None
    if x.is_meta:
        raise ValueError("query expects a tensor with data, got a meta tensor")
    if x.layout != torch.strided:
        raise ValueError(f"query expects a dense tensor, got layout {x.layout}: call .to_dense() first")
    if not x.is_floating_point():
        raise ValueError(f"query expects a floating-point tensor in [0, 1], got dtype {x.dtype}")
    shape = tuple(input_shape)
    if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise ValueError(f"query expects shape (N, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("query expects at least one row, got an empty batch")
    x = x.detach().clone()
    if not torch.isfinite(x).all():
        raise ValueError("query input contains NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"query input must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return x


class Oracle(ABC):
    """Base class: validation, counting, budget, output mode. Subclasses implement :meth:`_probs`.

    Args:
        num_classes: K.
        input_shape: (C, H, W) expected for every row.
        output: ``"probs"`` ((N, K) float32 on the simplex) or ``"labels"`` ((N,) int64 top-1).
        budget: maximum number of rows ever answered (``None``: unlimited); a non-negative int.
        batch_size: evaluation chunk size (memory bound only; results do not depend on it).
        on_query: optional callback ``fn(n_rows)`` called after each answered batch (set once, here).
        accountant: the :class:`Accountant` to count on (``open_accounted`` passes one it keeps);
            default: a private one with ``budget``.

    Attributes (read-only):
        budget, queries_used, remaining (``budget - queries_used``, ``None`` when unlimited).
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
        accountant: Accountant | None = None,
    ) -> None:
        if output not in OUTPUT_MODES:
            raise ValueError(f"output must be one of {OUTPUT_MODES}, got {output!r}")
        acct = accountant if accountant is not None else Accountant(budget)
        if accountant is not None and budget is not None and accountant.budget != check_budget(budget):
            raise ValueError("budget disagrees with the accountant's")
        if on_query is not None:
            acct.on_query = on_query
        self.__acct = acct
        self.__num_classes = int(num_classes)
        self.__input_shape = tuple(int(s) for s in input_shape)
        self.__output: OutputMode = output
        self.__batch_size = int(batch_size)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SEALED_NAMES:
            raise AttributeError(f"oracle attribute {name!r} is read-only")
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in _SEALED_NAMES:
            raise AttributeError(f"oracle attribute {name!r} is read-only")
        super().__delattr__(name)

    # ------------------------------------------------------------------ read-only description
    @property
    def num_classes(self) -> int:
        return self.__num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.__input_shape

    @property
    def output(self) -> OutputMode:
        return self.__output

    @property
    def batch_size(self) -> int:
        return self.__batch_size

    # ------------------------------------------------------------------ accounting (read-only)
    @property
    def budget(self) -> int | None:
        return self.__acct.budget

    @property
    def queries_used(self) -> int:
        return self.__acct.used

    @property
    def remaining(self) -> int | None:
        return self.__acct.remaining

    queries_left = remaining

    # ------------------------------------------------------------------ the query
    def validate(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the problem when ``x`` is not a valid batch."""
        plain_batch(x, self.__input_shape)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Answer a batch. Shape: (N, C, H, W) in [0, 1] -> (N, K) probabilities or (N,) labels.

        Raises:
            ValueError: wrong type, layout, dtype, shape, NaN/inf or values outside [0, 1].
            QueryBudgetExceeded: ``N`` exceeds :attr:`remaining` (nothing is evaluated or counted).
        """
        return self._answer_validated(plain_batch(x, self.__input_shape))

    def _answer_validated(self, xp: torch.Tensor) -> torch.Tensor:
        """:meth:`query` of a batch already returned by :func:`plain_batch` (same shape): count, answer.

        For server code that validates a batch before it waits for the model (the gateway checks requests in
        their own threads, so that the model's lock covers the forward pass only). Not on the sealed view an
        attack receives; ``xp`` must be :func:`plain_batch`'s result (a plain, detached, checked copy).
        """
        n = int(xp.shape[0])
        self.__acct.reserve(n)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                probs = torch.cat([self._probs(chunk) for chunk in xp.split(self.__batch_size)])
                out = probs.argmax(dim=1) if self.__output == "labels" else probs.float()
            # leave inference mode: callers may use the answer as a training target
            out = out.clone().to(xp.device)
        except BaseException:
            self.__acct.refund(n)
            raise
        self.__acct.answered(n, x=xp, probs=probs, seconds=time.perf_counter() - t0)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.query(x)

    def sealed(self) -> "SealedOracle":
        """The view an attack receives (reads and ``query`` only)."""
        return SealedOracle(self)

    @abstractmethod
    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, K) probabilities (rows sum to 1). Runs in inference mode."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_classes={self.num_classes}, input_shape={self.input_shape}, "
                f"output={self.output!r}, queries_used={self.queries_used}, budget={self.budget})")


class SealedOracle:
    """What an attack receives: the oracle's public reads and its ``query``; nothing can be set.

    Attributes (read-only): ``input_shape``, ``num_classes``, ``output``, ``budget``, ``queries_used``,
    ``remaining`` (alias ``queries_left``).
    """

    __slots__ = ("_SealedOracle__oracle",)

    def __init__(self, oracle: Oracle) -> None:
        object.__setattr__(self, "_SealedOracle__oracle", oracle)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a sealed oracle is read-only (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"a sealed oracle is read-only (cannot delete {name!r})")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.__oracle.input_shape

    @property
    def num_classes(self) -> int:
        return self.__oracle.num_classes

    @property
    def output(self) -> OutputMode:
        return self.__oracle.output

    @property
    def budget(self) -> int | None:
        return self.__oracle.budget

    @property
    def queries_used(self) -> int:
        return self.__oracle.queries_used

    @property
    def remaining(self) -> int | None:
        return self.__oracle.remaining

    queries_left = remaining

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """See :meth:`Oracle.query`."""
        return self.__oracle.query(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.__oracle.query(x)

    def __repr__(self) -> str:
        return (f"SealedOracle(num_classes={self.num_classes}, input_shape={self.input_shape}, "
                f"output={self.output!r}, queries_used={self.queries_used}, budget={self.budget})")


class ModelOracle(Oracle):
    """An oracle over one classifier (``model(x) -> logits``), answering its softmax in float32.

    Reduced-precision answers would swamp the epsilon = 1e-3 finite differences of zeroth-order
    attacks such as DFME on a GPU, so there is no autocast. The module is held privately (eval mode).
    """

    def __init__(self, model: nn.Module, *, num_classes: int, input_shape: Sequence[int],
                 device: torch.device | str = "cpu", **kwargs: Any) -> None:
        from misleader.oracle.backends import ModelBackend

        super().__init__(num_classes=num_classes, input_shape=input_shape, **kwargs)
        dev = torch.device(device)
        self.__backend = ModelBackend(model.to(dev).eval(), name="model", device=dev)

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.__backend(x)


class EnsembleOracle(Oracle):
    """Soft voting: the (weighted) mean of the members' softmax probabilities (the ``ensemble`` backend).

    Args:
        members: classifiers returning logits (N, K).
        weights: optional non-negative weights (normalised to sum 1); equal by default, as the
            MISLEADER authors' ``SoftVotingEnsemble``.
    """

    def __init__(self, members: Sequence[nn.Module], *, num_classes: int, input_shape: Sequence[int],
                 weights: Sequence[float] | None = None, device: torch.device | str = "cpu", **kwargs: Any) -> None:
        from misleader.errors import MisleaderError
        from misleader.oracle.backends import EnsembleBackend

        super().__init__(num_classes=num_classes, input_shape=input_shape, **kwargs)
        if not members:
            raise ValueError("an ensemble needs at least one member")
        dev = torch.device(device)
        try:
            self.__backend = EnsembleBackend([m.to(dev).eval() for m in members],
                                             names=[f"m{i}" for i in range(len(members))],
                                             weights=None if weights is None else list(weights), device=dev)
        except MisleaderError as exc:
            raise ValueError(str(exc)) from None
        self.__n = len(members)

    @property
    def num_members(self) -> int:
        return self.__n

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.__backend(x)


def soft_vote(logits: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Mean of softmaxes of a list of (N, K) logits (weighted if ``weights``). Differentiable."""
    probs = torch.stack([torch.softmax(l.float(), dim=1) for l in logits])  # (M, N, K)
    if weights is None:
        return probs.mean(0)
    w = torch.tensor(list(weights), dtype=probs.dtype, device=probs.device)
    return (probs * (w / w.sum()).view(-1, 1, 1)).sum(0)
