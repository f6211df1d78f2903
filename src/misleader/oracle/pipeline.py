"""A defended model as a pipeline of steps (manifest format 2), and the oracle that serves it.

``input* -> backend -> (gate | output)*`` (see :mod:`misleader.oracle.steps` for the step kinds):

* input steps transform the query batch ``x``;
* exactly one backend turns it into probabilities ``p`` (N, K);
* a gate computes a per-row weight ``w`` in [0, 1] and mixes ``p`` with its branch's answer on the
  *original* batch: ``(1 - w) * p + w * branch(x)``; a hard gate (``w`` in {0, 1}) evaluates the branch
  only on the rows with ``w = 1``;
* an output step maps ``(p, x) -> p'`` (``x``: the original batch).

Randomness comes only from the folder's generator (``torch.Generator`` seeded with the manifest's
``seed``), so reopening a folder reproduces its answers for the same sequence of queries.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from misleader.errors import MisleaderError
from misleader.oracle.base import Oracle
from misleader.oracle.manifest import Target
from misleader.oracle.steps import STEPS, BackendStep, GateStep, InputStep, Step, StepContext

log = logging.getLogger(__name__)


class Pipeline:
    """Runs ``input* -> backend -> (gate | output)*`` on a batch: (N, C, H, W) in [0, 1] -> (N, K) float32.

    Args:
        steps: built steps, in manifest order (validated: inputs first, then one backend).
    """

    def __init__(self, steps: Sequence[Step]) -> None:
        steps = list(steps)
        kinds = [s.kind for s in steps]
        if kinds.count("backend") != 1:
            raise MisleaderError(f"a pipeline needs exactly one backend step, got {kinds.count('backend')} "
                                 f"(steps: {', '.join(kinds) or 'none'}): fix the manifest's 'steps'")
        b = kinds.index("backend")
        if any(k != "input" for k in kinds[:b]) or any(k == "input" for k in kinds[b:]):
            raise MisleaderError(f"pipeline steps must be input* backend (gate|output)*, got {' -> '.join(kinds)}")
        self.__inputs: list[InputStep] = steps[:b]  # type: ignore[assignment]
        self.__backend: BackendStep = steps[b]  # type: ignore[assignment]
        self.__after: list[Step] = steps[b + 1:]
        self.__steps = steps

    @property
    def stochastic(self) -> bool:
        return any(s.stochastic for s in self.__steps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None)

    def trace(self, x: torch.Tensor) -> list[tuple[Step, torch.Tensor, torch.Tensor]]:
        """Run ``x`` and return ``(step, input, output)`` for every step (tests and diagnostics only)."""
        record: list[tuple[Step, torch.Tensor, torch.Tensor]] = []
        with torch.inference_mode():  # as the oracle runs it
            self._run(x, record)
        return record

    def _run(self, x: torch.Tensor, record: list | None) -> torch.Tensor:
        x0 = x
        for s in self.__inputs:
            y = s(x)
            if record is not None:
                record.append((s, x, y))
            x = y
        p = self.__backend(x).float()
        if record is not None:
            record.append((self.__backend, x, p))
        for s in self.__after:
            q = _apply_gate(s, p, x0) if isinstance(s, GateStep) else s(p, x0).float()
            if record is not None:
                record.append((s, p, q))
            p = q
        return p

    def to_manifest(self) -> list[dict[str, Any]]:
        return [s.to_manifest() for s in self.__steps]

    def describe(self) -> list[dict[str, Any]]:
        """What a server may show a client: each step's :meth:`~misleader.oracle.steps.Step.describe`."""
        return [s.describe() for s in self.__steps]


def _apply_gate(gate: GateStep, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    w = gate.weight(p, x).to(p.device).float().reshape(-1)
    if gate.hard:
        rows = (w > 0.5).nonzero().flatten()
        if len(rows) == 0:
            return p
        out = p.clone()
        out[rows] = gate.branch(x[rows.to(x.device)]).to(p.device).float()
        return out
    return (1 - w).unsqueeze(1) * p + w.unsqueeze(1) * gate.branch(x).to(p.device).float()


def build_steps(entries: Sequence[dict[str, Any]], *, ctx: StepContext) -> list[Step]:
    """Build each manifest entry with its registered class (unknown type: one line listing the known)."""
    import misleader.defenses  # noqa: F401  (every defense module registers its steps on import)

    steps = []
    for i, e in enumerate(entries):
        cls = STEPS.get(e.get("type"))
        if cls.kind != e.get("kind"):
            raise MisleaderError(f"steps[{i}]: step type {e.get('type')!r} is a {cls.kind} step, the manifest says "
                                 f"{e.get('kind')!r}: fix the manifest")
        params = {k: v for k, v in e.items() if k not in ("kind", "type")}
        steps.append(cls.from_manifest(params, ctx=ctx))
    return steps


def folder_generator(seed: int, device: torch.device) -> torch.Generator:
    """The folder's generator: seeded with the manifest's ``seed``, on ``device`` where possible."""
    try:
        g = torch.Generator(device=device)
    except RuntimeError:
        g = torch.Generator()
    return g.manual_seed(int(seed))


def traced(model: nn.Module, *, input_shape: Sequence[int], device: torch.device) -> nn.Module:
    """``model`` recorded by ``torch.jit.trace`` when that gives the same answers, else ``model`` itself.

    A traced module runs its whole forward pass in C++, without taking Python's GIL between operations, so a
    server's other threads (HTTP, the store) do not hold up its forward passes. It runs the same operations (not
    frozen, not fused), and it is kept only if it answers probe batches (random, all-zero, all-one, of several
    sizes) bit for bit like ``model``.
    """
    import warnings

    probe = torch.rand(3, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        # (the input shape is fixed, so shape tests recorded as constants are right; torch.jit is deprecated in favour
        # of torch.compile, which costs a compilation per model and process: a later torch without it falls back)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            tm = torch.jit.trace(model, probe, check_trace=False)
            checks = (probe, probe[:1], torch.zeros_like(probe), torch.ones_like(probe[:2]),
                      torch.cat([probe, 1 - probe]))
            same = all(torch.equal(tm(p), model(p)) for p in checks)
    except Exception as exc:  # noqa: BLE001 - an untraceable model is served as it is
        log.info("model not traced (%s: %s): served in eager mode", type(exc).__name__, exc)
        return model
    if not same:
        log.info("traced model answers differently from the model: served in eager mode")
        return model
    return tm


def model_loader(target: Target, *, device: torch.device) -> Callable[[str], nn.Module]:
    """``load(name) -> nn.Module`` for the target's models (checked, cached; eval mode, on ``device``)."""
    from misleader.training.checkpoint import load_model

    cache: dict[str, nn.Module] = {}

    def load(name: str) -> nn.Module:
        if name not in cache:
            ref = target.models.get(name)
            if ref is None:
                raise MisleaderError(f"{target.folder}: a step names model {name!r}, which the manifest does not "
                                     f"declare (declared: {', '.join(target.models) or 'none'})")
            model, meta = load_model(ref.sidecar, device=device, expect_sha256=ref.sha256)
            if int(meta["num_classes"]) != target.num_classes or tuple(meta["input_shape"]) != target.input_shape:
                raise MisleaderError(
                    f"{target.folder}: model {name!r} answers {meta['num_classes']} classes for input "
                    f"{meta['input_shape']}, the manifest says {target.num_classes} and {list(target.input_shape)}: "
                    "re-create the folder")
            cache[name] = model.eval()
        return cache[name]

    return load


def build_pipeline(target: Target, *, device: torch.device, trace: bool = False) -> Pipeline:
    """The :class:`Pipeline` a target folder serves (models checked, generator seeded per folder; ``trace``: on a CPU,
    the models of the ``model`` and ``ensemble`` backends are :func:`traced` copies; steps that need gradients or
    look inside a model, such as MAD, GRAD2 or DNF's exits, get the model itself)."""
    load = model_loader(target, device=device)
    forward = None
    if trace and device.type == "cpu":  # (on CUDA the JIT's executor may fuse operations later: not bit for bit)
        cache: dict[str, nn.Module] = {}

        def forward(name: str) -> nn.Module:
            if name not in cache:
                cache[name] = traced(load(name), input_shape=target.input_shape, device=device)
            return cache[name]

    ctx = StepContext(folder=Path(target.folder), device=device, generator=folder_generator(target.seed, device),
                      num_classes=target.num_classes, input_shape=target.input_shape, load_model=load,
                      load_forward_model=forward)

    def build_branch(entries: list[dict[str, Any]]) -> Callable[[torch.Tensor], torch.Tensor]:
        return Pipeline(build_steps(entries, ctx=ctx))

    ctx.build_branch = build_branch
    return Pipeline(build_steps(target.steps, ctx=ctx))


class PipelineOracle(Oracle):
    """An oracle over a :class:`Pipeline` (the pipeline is held privately, never handed out)."""

    def __init__(self, pipeline: Pipeline, *, num_classes: int, input_shape: Sequence[int],
                 device: torch.device | str = "cpu", **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, input_shape=input_shape, **kwargs)
        self.__pipeline = pipeline
        self.__device = torch.device(device)

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.__pipeline(x.to(self.__device, non_blocking=True).float())

    def describe(self) -> list[dict[str, Any]]:
        return self.__pipeline.describe()


__all__ = ["Pipeline", "PipelineOracle", "build_pipeline", "build_steps", "folder_generator", "model_loader"]
