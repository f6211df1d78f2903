"""The GNMax RDP accountant against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from misleader.pow import rdp


def test_log_q_union_bound_by_hand() -> None:
    # counts [3, 0], sigma 1: gap 3, noise difference ~ N(0, 2): q = Pr[N(0,2) >= 3] = Phi(-3/sqrt 2)
    # = 0.5 * erfc(1.5) = 0.5 * 0.0338949 = 0.0169474; ln = -4.07764 (cap ln(1 - 1/2) = -0.693 not binding)
    assert rdp.log_q_gnmax(torch.tensor([3.0, 0.0]), sigma=1.0) == pytest.approx(-4.07764, abs=1e-4)
    # counts [1, 0], sigma 1: 0.5 * erfc(0.5) = 0.5 * 0.479500 = 0.239750; ln = -1.42816
    assert rdp.log_q_gnmax(torch.tensor([1.0, 0.0]), sigma=1.0) == pytest.approx(-1.42816, abs=1e-4)
    # counts [1, 1, 1, 1]: three ties give 3 * 0.5 = 1.5 > 1, so the cap ln(1 - 1/4) = -0.287682 applies
    assert rdp.log_q_gnmax(torch.tensor([1.0, 1.0, 1.0, 1.0]), sigma=3.0) == pytest.approx(math.log(0.75), abs=1e-9)


def test_data_independent_epsilon_by_hand() -> None:
    # sigma 10, delta 1e-5, orders {2, 35}: RDP = order / 100 = {0.02, 0.35};
    # eps(2) = 0.02 + ln(1e5)/1 = 0.02 + 11.512925 = 11.532925; eps(35) = 0.35 + 11.512925/34 = 0.688615
    orders = torch.tensor([2.0, 35.0])
    r = rdp.rdp_data_independent(sigma=10.0, orders=orders)
    assert r.tolist() == pytest.approx([0.02, 0.35])
    eps, order = rdp.eps_from_rdp(r, orders=orders, delta=1e-5)
    assert eps == pytest.approx(0.688615, abs=1e-6) and order == 35.0


def test_data_dependent_rdp_by_hand() -> None:
    # logq = -20, sigma = 1, order 2 (Thm 6 with Prop. 10's orders):
    #   mu2 = sqrt(1 * 20) = 4.472136, mu1 = 5.472136; rdp1 = 5.472136, rdp2 = 4.472136
    #   conditions: -logq = 20 > rdp2; log_a2 = (mu2-1)*rdp2 = 15.527864;
    #   15.527864 - 4.472136*(ln(1+1/4.472136) + ln(1+1/3.472136)) = 15.527864 - 2.035677 = 13.49 >= -20
    #   log(1-q) = -2.06e-9;  (logq + rdp2)(1 - 1/mu2) = -15.527864 * 0.776393 = -12.05572
    #   log_a = -2.06e-9 - ln(1 - e^-12.05572) = 5.8112e-6;  log_b = rdp1 - logq/(mu1-1) = 9.944272
    #   log_s = ln(e^(log1q + log_a) + e^(logq + log_b)) = ln(1 + 5.8112e-6 + e^-10.055728 = 4.29391e-5)
    #         = 4.8749e-5;  RDP(2) = log_s / (2 - 1) = 4.875e-5 (far below the data-independent 2)
    got = rdp.rdp_gnmax(-20.0, sigma=1.0, orders=torch.tensor([2.0]))
    assert float(got[0]) == pytest.approx(4.875e-5, rel=1e-3)


def test_rdp_is_capped_by_the_data_independent_value() -> None:
    orders = torch.tensor(rdp.DEFAULT_ORDERS, dtype=torch.float64)
    cap = rdp.rdp_data_independent(sigma=2.0, orders=orders)
    for logq in (-0.01, -0.5, -3.0, -10.0, -50.0, -500.0):
        r = rdp.rdp_gnmax(logq, sigma=2.0, orders=orders)
        assert bool((r <= cap).all()) and bool((r >= 0).all())
    # logq = -0.5, sigma 1: mu2 = sqrt(0.5) < 1, the data-dependent bound does not apply -> exactly the cap
    assert rdp.rdp_gnmax(-0.5, sigma=1.0, orders=orders).tolist() == orders.tolist()


def test_unanimous_and_split_votes() -> None:
    # logq = -inf (output certain): RDP 0, eps = ln(1e5)/(1000 - 1) = 11.512925/999 = 0.011524
    r = rdp.rdp_gnmax(-math.inf, sigma=10.0, orders=torch.tensor(rdp.DEFAULT_ORDERS))
    assert rdp.eps_from_rdp(r, orders=torch.tensor(rdp.DEFAULT_ORDERS), delta=1e-5)[0] == pytest.approx(0.011524, abs=1e-6)
    votes = torch.tensor([[250] + [0] * 9, [200, 50] + [0] * 8, [125, 125] + [0] * 8])
    eps = rdp.gnmax_epsilon(votes, sigma=10.0, delta=1e-5)
    # data-independent ceiling for sigma 10, delta 1e-5: min_l l/100 + 11.512925/(l-1) ~ 0.6886 (l = 35)
    assert eps[0] < eps[1] < eps[2] <= 0.68862
    assert eps[2] == pytest.approx(0.688615, abs=1e-4)
