"""Extraction attacks (Knockoff Nets, DFME, DFMS-HL, JBDA, adaptive DFME variants) against any oracle."""

import importlib

from misleader.attacks.base import ATTACKS, Attack, AttackResult, register_attack

# a module that fails to import is an error, never skipped
for _mod in ("knockoff", "dfme", "dfms_hl", "jbda", "dfme_seeded", "dfme_filtered", "dfme_relabel"):
    importlib.import_module(f"misleader.attacks.{_mod}")

__all__ = ["ATTACKS", "Attack", "AttackResult", "register_attack"]
