"""Defenses: builders that turn a victim (or a ``--base`` defense folder) into a defended target folder.

Each defense registers one :class:`~misleader.defenses.base.DefenseSpec` in
:data:`~misleader.defenses.base.DEFENSES` (and its pipeline steps in
:data:`misleader.oracle.steps.STEPS`) when its module is imported. Importing this package imports
*every* module and subpackage in it (a module that fails to import is an error, never skipped), so
the ``misleader defend`` subcommands, the spec validation, ``load_oracle`` and the conformance tests
see every defense without a list to maintain.

* ``misleader``: :mod:`misleader.defenses.misleader_cli` (the trained MISLEADER ensemble);
* ``undefended``: :mod:`misleader.defenses.undefended` (the victim itself);
* the folder writer every builder uses: :mod:`misleader.defenses.folder`.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from typing import Any

from misleader.defenses.base import DEFENSES, DefenseSpec, defense_spec, register_defense
from misleader.defenses.undefended import defend_undefended

log = logging.getLogger(__name__)


def _import_all() -> None:
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


_import_all()


def build_defense(name: str, **kwargs: Any) -> dict[str, Any]:
    """Run the defense builder ``name`` (see :data:`DEFENSES`) with keyword arguments."""
    return defense_spec(name)(**kwargs)


def list_defenses() -> list[str]:
    return DEFENSES.names()


__all__ = ["DEFENSES", "DefenseSpec", "register_defense", "build_defense", "defend_undefended", "defense_spec",
           "list_defenses"]
