"""Conformance of every registered defense and every registered pipeline step (derived from the registries:
defenses and steps other modules register later are included automatically).

Defenses (``DEFENSES``): built with ``spec.test_params`` on a tiny digits victim; the folder opens, answers
one simplex row per query row, answers identically when reopened (same seed), and each output step of its
pipeline keeps its declared ``l1_bound`` and ``preserves_argmax`` on the test rows.

Steps (``STEPS`` with a ``test_spec``): built by ``from_manifest`` on tiny random models; shapes, simplex,
``l1_bound``, ``preserves_argmax``, gates' weights in [0, 1] (hard: 0/1), and the same generator seed gives
the same answers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import misleader.defenses  # noqa: F401  (registers every defense and its steps)
from misleader import load_oracle
from misleader.defenses.base import DEFENSES, defense_spec
from misleader.models import create_model
from misleader.oracle.load import open_accounted
from misleader.oracle.manifest import read_target
from misleader.oracle.pipeline import Pipeline, build_pipeline, build_steps
from misleader.oracle.steps import STEPS, BackendStep, GateStep, InputStep, OutputStep, StepContext

K, SHAPE, N = 10, (1, 32, 32), 24
ATOL = 1e-5
#: steps the test can build alone: a ``test_spec``, or a ``conformance_entry`` that writes the files it names
STEP_NAMES = [n for n in STEPS.names()
              if STEPS.get(n).test_spec is not None or "conformance_entry" in vars(STEPS.get(n))]


def assert_simplex(p: torch.Tensor, n: int) -> None:
    assert p.shape == (n, K) and p.dtype == torch.float32
    assert torch.isfinite(p).all() and (p >= -ATOL).all()
    assert torch.allclose(p.sum(1), torch.ones(n), atol=ATOL)


def check_output_contract(step, p_in: torch.Tensor, p_out: torch.Tensor) -> None:  # noqa: ANN001
    """The step's declared l1_bound and preserves_argmax hold row by row (ties at the top allowed)."""
    if step.l1_bound is not None:
        l1 = (p_out - p_in).abs().sum(1)
        assert (l1 <= step.l1_bound + ATOL).all(), f"{step.type_name}: L1 {float(l1.max()):.4g} > {step.l1_bound}"
    if step.preserves_argmax:
        top = p_in.argmax(1)
        kept = p_out.gather(1, top[:, None]).squeeze(1) >= p_out.max(1).values - 1e-7
        assert kept.all(), f"{step.type_name} declares preserves_argmax but changed the top-1 of {int((~kept).sum())} rows"


def _queries() -> torch.Tensor:
    return torch.rand(N, *SHAPE, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", DEFENSES.names())
def test_defense_conformance(name, tiny_victim, tmp_path):
    spec = defense_spec(name)
    out = tmp_path / name
    res = spec(victim=tiny_victim, base=None, out=out, data_dir=None, seed=0, device="cpu", force=False,
               **spec.test_params)
    for key in ("test_accuracy", "fidelity", "mean_l1_to_victim"):
        assert 0.0 <= float(res[key]) <= 2.0
    x = _queries()
    a, b = load_oracle(out).query(x), load_oracle(out).query(x)
    assert_simplex(a, N)
    assert torch.equal(a, b), f"{name}: reopening the folder with the same seed changed its answers"
    # the gateway opens folders with traced backend models: the same answers, every step still built
    served, _ = open_accounted(out, trace=True)
    assert torch.equal(served.query(x), a), f"{name}: the gateway's traced pipeline answers differently"
    labels = load_oracle(out, output="labels").query(x)
    assert labels.shape == (N,) and labels.dtype == torch.int64
    target = read_target(out)
    for step, p_in, p_out in build_pipeline(target, device=torch.device("cpu")).trace(x):
        if isinstance(step, OutputStep):
            check_output_contract(step, p_in, p_out)
    if not spec.stochastic:
        assert torch.equal(load_oracle(out).query(x[:5]), a[:5])


def _context(folder: Path, seed: int) -> StepContext:
    models: dict[str, torch.nn.Module] = {}

    def load(name: str) -> torch.nn.Module:
        if name not in models:
            torch.manual_seed(sum(map(ord, name)))
            models[name] = create_model("lenet5_fifth", in_channels=SHAPE[0], num_classes=K).eval()
        return models[name]

    ctx = StepContext(folder=folder, device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed),
                      num_classes=K, input_shape=SHAPE, load_model=load, extra={"models": models})
    ctx.build_branch = lambda entries: Pipeline(build_steps(entries, ctx=ctx))
    return ctx


def _run_step(name: str, tmp_path: Path, seed: int) -> tuple[object, torch.Tensor, torch.Tensor]:
    cls = STEPS.get(name)
    ctx = _context(tmp_path, seed)
    entry = cls.conformance_entry(ctx=ctx)
    assert entry is not None, f"{name}: listed as testable but gives no conformance entry"
    step = cls.from_manifest(entry, ctx=ctx)
    g = torch.Generator().manual_seed(11)
    x = torch.rand(N, *SHAPE, generator=g)
    p = torch.softmax(3 * torch.randn(N, K, generator=g), 1)
    with torch.inference_mode():
        if isinstance(step, InputStep):
            y = step(x)
        elif isinstance(step, BackendStep):
            y = step(x)
        elif isinstance(step, OutputStep):
            y = step(p, x)
        elif isinstance(step, GateStep):
            y = torch.cat([step.weight(p, x).reshape(-1, 1).float(), step.branch(x).float()], 1)
        else:
            raise AssertionError(f"{name}: unknown step kind {step.kind}")
    return step, (x if isinstance(step, InputStep) else p), y


@pytest.mark.parametrize("name", STEP_NAMES)
def test_step_conformance(name, tmp_path):
    step, inp, out = _run_step(name, tmp_path, seed=0)
    assert step.kind == STEPS.get(name).kind and step.to_manifest()["type"] == name
    if isinstance(step, InputStep):
        assert out.shape == inp.shape and torch.isfinite(out).all()
    elif isinstance(step, BackendStep):
        assert_simplex(out, N)
    elif isinstance(step, OutputStep):
        assert_simplex(out, N)
        check_output_contract(step, inp, out)
    else:
        w, branch = out[:, 0], out[:, 1:]
        assert ((w >= 0) & (w <= 1)).all()
        if step.hard:
            assert ((w == 0) | (w == 1)).all()
        assert_simplex(branch.contiguous(), N)
    _, _, again = _run_step(name, tmp_path, seed=0)
    assert torch.equal(out, again), f"{name}: the same generator seed gave different answers"
