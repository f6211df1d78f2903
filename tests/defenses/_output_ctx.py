"""Shared by the output-step tests: tiny models and a StepContext that serves them by name."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from misleader.oracle.steps import STEPS, Step, StepContext

K = 10
SHAPE = (1, 6, 6)


def tiny_net(seed: int, *, k: int = K, hidden: int = 12) -> nn.Module:
    """Flatten -> Linear(36, hidden) -> ReLU -> Linear(hidden, k): a tiny surrogate, (N, 1, 6, 6) -> (N, k)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, hidden), nn.ReLU(), nn.Linear(hidden, k)).double().eval()


def make_ctx(*, seed: int = 0, k: int = K) -> StepContext:
    """A StepContext whose ``load_model`` serves any name a step asks for (a tiny net seeded by the name)."""
    models: dict[str, nn.Module] = {}

    def load(name: str) -> nn.Module:
        if name not in models:
            models[name] = tiny_net(sum(map(ord, name)), k=k).float()
        return models[name]

    return StepContext(folder=Path("."), device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed),
                       num_classes=k, input_shape=SHAPE, load_model=load)


def build_step(type_name: str, spec: dict, *, seed: int = 0, k: int = K) -> Step:
    """Build the registered step ``type_name`` from its manifest entry ``spec`` with a fresh context."""
    import misleader.defenses.adaptive_misinfo  # noqa: F401  (registers)
    import misleader.defenses.grad2  # noqa: F401
    import misleader.defenses.mad  # noqa: F401
    import misleader.defenses.postprocess  # noqa: F401
    import misleader.defenses.randp  # noqa: F401

    return STEPS.get(type_name).from_manifest(dict(spec), ctx=make_ctx(seed=seed, k=k))


def random_probs(n: int, *, k: int = K, seed: int = 0, temperature: float = 2.0) -> torch.Tensor:
    """(n, k) float32 rows on the simplex from random logits."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, k, generator=g) * temperature, dim=1)


def random_x(n: int, *, seed: int = 0) -> torch.Tensor:
    """(n, 1, 6, 6) float32 in [0, 1]."""
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed))
