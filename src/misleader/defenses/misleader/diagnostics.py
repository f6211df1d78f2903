"""MISLEADER diagnostics: test-set evaluation of an ensemble and how far it moves off the victim.

Paper: MISLEADER, arXiv 2506.02362, https://arxiv.org/abs/2506.02362 (see :mod:`misleader.defenses.misleader`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from misleader.data.augment import augment, strong_augmentation
from misleader.data.loader import to_unit
from misleader.metrics import accuracy, fidelity, kl_divergence, mean_l1
from misleader.models import GeneratorA, tanh_to_unit
from misleader.training.evaluate import predict_probs
from misleader.utils import derive_seed, make_generator

def _diag_inputs(x_test: torch.Tensor, *, channels: int, size: int, seed: int, n_gen: int) -> dict[str, torch.Tensor]:
    """Fixed inputs for the misleading diagnostics: strongly augmented test images and GeneratorA noise."""
    g = make_generator(seed)
    aug = strong_augmentation(image_size=size, channels=channels)
    x_aug = torch.cat([augment(aug, to_unit(c), generator=g) for c in x_test.split(2048)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(g))
        gen = GeneratorA(nz=256, ngf=64, img_size=size, nc=channels).train()  # untrained, as a DFME attack starts
        with torch.no_grad():
            z = torch.randn(n_gen, 256, generator=g)
            x_gen = torch.cat([tanh_to_unit(gen(c)) for c in z.split(256)]).clamp(0, 1)
    return {"augmented_test": x_aug, "generator": x_gen}


def _compare(p_victim: torch.Tensor, p_def: torch.Tensor) -> dict[str, float]:
    return {"kl_victim_to_defense": kl_divergence(p_victim, p_def, eps=1e-8), "mean_l1_to_victim": mean_l1(p_def, p_victim),
            "fidelity": fidelity(p_def, p_victim)}


def evaluate_defense(*, victim: nn.Module, members: Sequence[nn.Module], data, device: torch.device,
                     seed: int = 0, generator_samples: int = 256) -> dict[str, Any]:
    """Test-set evaluation of a soft-voting ensemble against its victim (after training and selection).

    Returns ``test_accuracy``, ``victim_test_accuracy``, ``fidelity``, ``mean_l1_to_victim``,
    ``member_test_accuracy`` (list) and ``diagnostics``: on strongly augmented test images and on
    the outputs of an untrained DFME generator, the KL(victim || defense), mean L1 and top-1 agreement
    of the ensemble and of each member (how far the defense moves away from the victim off the clean
    distribution).
    """
    victim = victim.to(device)
    members = [m.to(device) for m in members]
    pv = predict_probs(victim, data.x_test, device=device)
    pm = [predict_probs(m, data.x_test, device=device) for m in members]
    pe = torch.stack(pm).mean(0)
    channels, size = int(data.x_test.shape[1]), int(data.x_test.shape[-1])
    diag_x = _diag_inputs(data.x_test, channels=channels, size=size, seed=seed, n_gen=generator_samples)
    diagnostics: dict[str, Any] = {}
    for key, xs in diag_x.items():
        qv = predict_probs(victim, xs, device=device)
        qm = [predict_probs(m, xs, device=device) for m in members]
        diagnostics[key] = {"ensemble": _compare(qv, torch.stack(qm).mean(0)),
                            "members": [_compare(qv, q) for q in qm]}
    return {
        "test_accuracy": accuracy(pe, data.y_test),
        "victim_test_accuracy": accuracy(pv, data.y_test),
        "fidelity": fidelity(pe, pv),
        "mean_l1_to_victim": mean_l1(pe, pv),
        "member_test_accuracy": [accuracy(p, data.y_test) for p in pm],
        "member_fidelity": [fidelity(p, pv) for p in pm],
        "diagnostics": diagnostics,
    }

