"""Pipeline steps: the pieces a defended model is made of (manifest format 2).

A defense folder's ``manifest.json`` lists an ordered list of steps; :mod:`misleader.oracle.pipeline`
runs them on every query batch::

    x (N, C, H, W) in [0, 1]
      -> input steps   (InputStep:   x -> x',         e.g. MeCo/ACT random perturbation nets)
      -> one backend   (BackendStep: x' -> p (N, K),  a model, a soft-voting ensemble, early exits)
      -> gates/outputs (GateStep:    per row, mixes p with a branch sub-pipeline's answer by a score;
                        OutputStep:  p -> p',         RandP, MAD, GRAD², reverse sigmoid, rounding ...)

Each step type is a small class registered once in :data:`STEPS` under its ``type`` name and built by
``from_manifest(spec, ctx=...)`` from its manifest entry. A step declares:

* ``stochastic``: its answer depends on random draws (taken from ``ctx.generator`` only, a
  ``torch.Generator`` seeded per folder, so reopening a folder reproduces its answers);
* ``preserves_argmax``: the top-1 class of its output equals that of its input probabilities
  (output steps) -- checked by the defense conformance test where declared;
* ``l1_bound``: an upper bound on ``||p' - p||_1`` per row (output steps), or ``None`` for none.

Output steps also receive the *original* query batch ``x`` (MAD and GRAD² need it for their surrogate's
gradients). Steps never see the query count or the budget: the oracle around the pipeline does.

Manifest entry of a step (all steps)::

    {"kind": "output", "type": "randp", ...type-specific parameters...}

Parameters that must stay secret (e.g. a decoy permutation) are kept out of ``describe()``, which is
what a server may show a client.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import nn

from misleader.registry import Registry

StepKind = Literal["input", "backend", "gate", "output"]
STEP_KINDS: tuple[str, ...] = ("input", "backend", "gate", "output")


@dataclass
class StepContext:
    """What a step may use when it is built from its manifest entry.

    Attributes:
        folder: the defense folder (absolute).
        device: where models run.
        generator: the folder's seeded generator (on ``device`` where possible); the *only* source of
            randomness for stochastic steps.
        num_classes: K.
        input_shape: (C, H, W).
        load_model: ``load_model(name) -> nn.Module`` for a model declared in the manifest's ``models``
            table (the path is checked to stay inside the folder, the sha256 against the manifest).
        build_branch: ``build_branch(steps: list[dict]) -> Callable[[x], probs]`` builds a sub-pipeline
            (for gates' branches) over the same models.
    """

    folder: Path
    device: torch.device
    generator: torch.Generator
    num_classes: int
    input_shape: tuple[int, ...]
    load_model: Callable[[str], nn.Module]
    build_branch: Callable[[list[dict[str, Any]]], Callable[[torch.Tensor], torch.Tensor]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: ``load_forward_model(name)``: the same model for forward passes only (no gradients, no look inside it): the
    #: ``model`` and ``ensemble`` backends use it; the gateway makes it a traced copy
    #: (:func:`misleader.oracle.pipeline.traced`). ``None``: :attr:`load_model`.
    load_forward_model: Callable[[str], nn.Module] | None = None

    def forward_model(self, name: str) -> nn.Module:
        """:attr:`load_forward_model` (else :attr:`load_model`) of ``name``."""
        return (self.load_forward_model or self.load_model)(name)


class Step(ABC):
    """Base class of every pipeline step.

    Class attributes:
        kind: ``"input" | "backend" | "gate" | "output"``.
        type_name: the registry name (the manifest's ``"type"``).
        stochastic: answers depend on random draws from ``ctx.generator``.
        preserves_argmax: output steps: top-1 of the output equals top-1 of the input probabilities.

    Attributes:
        l1_bound: per-row bound on ``||p' - p||_1`` for output steps (``None``: no bound declared).
    """

    kind: ClassVar[StepKind]
    type_name: ClassVar[str] = ""
    stochastic: ClassVar[bool] = False
    preserves_argmax: ClassVar[bool] = False
    l1_bound: float | None = None
    #: a small manifest entry (without ``kind``/``type``) the step conformance test builds it from, with
    #: ``ctx.extra`` holding whatever models it names; ``None`` only for steps the test cannot build alone.
    test_spec: ClassVar[dict[str, Any] | None] = None

    @classmethod
    def conformance_entry(cls, *, ctx: "StepContext") -> dict[str, Any] | None:
        """The manifest entry the step conformance test builds this step from (``None``: not testable alone).

        Default: a copy of :attr:`test_spec`. A step whose entry names a file inside the folder overrides
        this to write a small random one into ``ctx.folder`` (with ``ctx.load_model`` for the models it
        names) and return the entry pointing at it.
        """
        return None if cls.test_spec is None else dict(cls.test_spec)

    @classmethod
    @abstractmethod
    def from_manifest(cls, spec: dict[str, Any], *, ctx: StepContext) -> "Step":
        """Build the step from its manifest entry (raise ``MisleaderError`` naming a bad key)."""

    @abstractmethod
    def to_manifest(self) -> dict[str, Any]:
        """The manifest entry that rebuilds this step (``kind``, ``type`` and parameters)."""

    def describe(self) -> dict[str, Any]:
        """A summary safe to show a client (no secrets); default: the manifest entry."""
        return self.to_manifest()


class InputStep(Step):
    """Transforms the query batch before the backend: (N, C, H, W) -> (N, C, H, W)."""

    kind: ClassVar[StepKind] = "input"

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class BackendStep(Step):
    """Turns inputs into probabilities: (N, C, H, W) in [0, 1] -> (N, K) float32 rows on the simplex."""

    kind: ClassVar[StepKind] = "backend"

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class OutputStep(Step):
    """Transforms probabilities: ``(probs (N, K), x (N, C, H, W)) -> probs' (N, K)`` on the simplex."""

    kind: ClassVar[StepKind] = "output"

    @abstractmethod
    def __call__(self, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


class GateStep(Step):
    """Per row, mixes the current answer with a branch's answer by a weight in [0, 1].

    ``weight(probs, x) -> (N,)``: 0 keeps the current answer, 1 takes the branch's (hard gates return
    0/1 and the pipeline evaluates the branch only on the rows that need it; soft gates such as
    Adaptive Misinformation return values in between: ``(1 - w) * p + w * branch(x)``).
    """

    kind: ClassVar[StepKind] = "gate"
    #: ``True``: ``weight`` returns only 0 or 1.
    hard: ClassVar[bool] = True

    @abstractmethod
    def weight(self, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The branch's probabilities for the rows ``x`` (N', C, H, W) -> (N', K)."""


#: type name -> Step subclass
STEPS: Registry[Step] = Registry("pipeline step")


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: register ``cls`` in :data:`STEPS` under ``cls.type_name``."""
    if not cls.type_name:
        raise ValueError(f"{cls.__name__} has no type_name")
    if cls.kind not in STEP_KINDS:
        raise ValueError(f"{cls.__name__}.kind must be one of {STEP_KINDS}, got {cls.kind!r}")
    STEPS.register(cls.type_name)(cls)
    return cls


__all__ = ["STEPS", "STEP_KINDS", "BackendStep", "GateStep", "InputStep", "OutputStep", "Step", "StepContext",
           "StepKind", "register_step"]
