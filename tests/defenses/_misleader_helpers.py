"""Helpers shared by the MISLEADER tests (tiny LeNets on random images)."""

from __future__ import annotations

import torch

from misleader.defenses.misleader import MemberConfig, MemberTrainer, kl_rows, train_member
from misleader.models import create_model
from misleader.utils import derive_seed, make_generator

ARCH = "lenet5_fifth"


def tiny_model(seed: int, arch: str = ARCH) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(arch, in_channels=1, num_classes=10)


def tiny_batch(seed: int, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def tiny_cfg(**kw) -> MemberConfig:
    base = {"arch": ARCH, "lam": 1.0, "temperature": 4.0, "alpha": 0.9, "epochs": 1, "batch_size": 16}
    base.update(kw)
    return MemberConfig(**base)


def replace_cfg(c: MemberConfig, **kw) -> MemberConfig:
    return MemberConfig.from_dict({**c.to_dict(), **kw})


def kl_d_s(d, s, x) -> float:
    with torch.no_grad():
        return float(kl_rows(d(x), s(x)).mean())


def tiny_trainer(c: MemberConfig, d_seed: int = 1, s_seed: int = 2) -> MemberTrainer:
    return MemberTrainer(config=c, defense=tiny_model(d_seed), clone=tiny_model(s_seed), device=torch.device("cpu"),
                         total_steps=100)


def tiny_data(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 1, 32, 32, generator=g) * 255).to(torch.uint8)
    return x, torch.randint(0, 10, (n,), generator=g)


def train_tiny(c: MemberConfig, seed: int = 0, **kw):
    """Train one member on 96 random images (validation: 32); returns (result, member, teacher)."""
    x, y = tiny_data()
    xv, yv = tiny_data(32, seed=1)
    gen = make_generator(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(gen))
        d, s = create_model(ARCH, in_channels=1, num_classes=10), create_model(ARCH, in_channels=1, num_classes=10)
    teacher = tiny_model(99)
    res = train_member(config=c, teacher=teacher, defense=d, clone=s, x_train=x, y_train=y, x_val=xv, y_val=yv,
                       device=torch.device("cpu"), generator=gen, **kw)
    return res, d, teacher
