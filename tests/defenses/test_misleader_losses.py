"""MISLEADER losses (defenses/misleader/losses.py): KD reduction, the attacker term and the clone loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from misleader.defenses.misleader import attacker_term, clone_loss, kd_loss


@settings(max_examples=30, deadline=None)
@given(t=st.floats(0.5, 8.0), alpha=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_kd_loss_matches_the_reference_formula(t, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    d, te = torch.randn(8, 10, generator=g) * 3, torch.randn(8, 10, generator=g) * 3
    y = torch.randint(0, 10, (8,), generator=g)
    ref = (torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(d / t, 1), F.softmax(te / t, 1)) * alpha * t * t
           + (1 - alpha) * F.cross_entropy(d, y))
    assert torch.allclose(kd_loss(d, te, y, temperature=t, alpha=alpha), ref, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), shift=st.floats(-5, 5))
def test_attacker_term_is_a_kl_that_flows_only_into_d(seed, shift):
    g = torch.Generator().manual_seed(seed)
    d = (torch.randn(6, 10, generator=g) * 2).requires_grad_()
    s = (torch.randn(6, 10, generator=g) * 2).requires_grad_()
    term = attacker_term(d, s)
    ref = F.kl_div(F.log_softmax(s, 1), F.softmax(d, 1), reduction="batchmean")  # the reference's kl_div(log s, d)
    assert term >= 0 and torch.allclose(term, ref, rtol=1e-4, atol=1e-6)
    term.backward()
    assert s.grad is None and d.grad is not None and d.grad.abs().sum() > 0
    assert float(attacker_term(d.detach(), d.detach() + shift)) == pytest.approx(0.0, abs=1e-5)  # shift-invariant
    d2, s2 = d.detach().requires_grad_(), s.detach().requires_grad_()
    clone_loss(s2, d2).backward()
    assert d2.grad is None and s2.grad.abs().sum() > 0

