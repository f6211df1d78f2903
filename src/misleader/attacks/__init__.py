"""Extraction attacks (Knockoff Nets, DFME, DFMS-HL, JBDA) against any oracle."""

import importlib

from misleader.attacks.base import ATTACKS, Attack, AttackResult, register_attack

for _mod in ("knockoff", "dfme", "dfms_hl", "jbda"):  # a module that fails to import is an error, never skipped
    importlib.import_module(f"misleader.attacks.{_mod}")

__all__ = ["ATTACKS", "Attack", "AttackResult", "register_attack"]
