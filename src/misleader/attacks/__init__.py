"""Extraction attacks (Knockoff Nets, DFME, DFMS-HL) against any oracle."""

import importlib

from misleader.attacks.base import ATTACKS, Attack, AttackResult, register_attack

for _mod in ("knockoff", "dfme", "dfms_hl"):
    try:
        importlib.import_module(f"misleader.attacks.{_mod}")
    except ModuleNotFoundError as _exc:  # modules arrive one by one
        if _exc.name != f"misleader.attacks.{_mod}":
            raise

__all__ = ["ATTACKS", "Attack", "AttackResult", "register_attack"]
