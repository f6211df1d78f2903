"""Calibrated proof-of-work (Dziedzic et al., ICLR 2022, https://arxiv.org/abs/2201.09243).

puzzle (signed SHA-256 challenges), rdp (GNMax accountant), meters (per-query leakage), calibration
(honest baseline -> deviation -> seconds -> bits), metering (the ``pow`` block of a query stream),
adaptive (meter-aware attacker streams).
"""
