"""The defense contract: one :class:`DefenseSpec` per defense, registered once in :data:`DEFENSES`.

A defense is a *builder*: the training-time work that turns a victim (and optionally a ``--base``
folder whose pipeline it wraps) into a defense folder (manifest format 2, see
:mod:`misleader.oracle.pipeline`) that :func:`misleader.load_oracle` opens. Everything user-visible
is derived from the registry: the ``misleader defend NAME`` subcommands (common flags ``--victim``,
``--base``, ``--out``, ``--force``, ``--seed``, ``--device``, ``--data-dir`` plus the defense's own
from :attr:`DefenseSpec.add_arguments`), the YAML spec validation and the defense conformance test
(which builds every registered defense with :attr:`DefenseSpec.test_params` on a tiny victim).

Builder signature (keyword-only)::

    build(*, victim: Path, base: Path | None, out: Path, data_dir: str | None, seed: int,
          device: str, force: bool, **params) -> dict   # the folder's result.json

``base=None`` means "wrap the victim". Output-only defenses typically return
``write_defense_folder(..., steps=[{"kind": "output", "type": ..., ...}])`` from
:mod:`misleader.defenses.folder`, which copies the base pipeline and appends their steps.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable

from misleader.registry import Registry


@dataclass(frozen=True)
class DefenseSpec:
    """How to build, configure and test one defense.

    Attributes:
        name: registry and CLI name (``misleader defend NAME``).
        help: one line for ``misleader defend --help``.
        build: the builder (signature in the module docstring); returns the ``result.json`` dict.
        add_arguments: adds the defense's own CLI flags to its subparser (``None``: none).
        params_from_args: maps the parsed CLI namespace to the builder's ``**params``.
        paper: link to the method's paper.
        stochastic: the folder's answers depend on random draws (from its seeded generator).
        test_params: small settings with which the conformance test builds it in seconds.
        description: longer text for ``misleader defend NAME --help``.
    """

    name: str
    help: str
    build: Callable[..., dict[str, Any]]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    params_from_args: Callable[[argparse.Namespace], dict[str, Any]] | None = None
    paper: str = ""
    stochastic: bool = False
    test_params: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def __call__(self, **kwargs: Any) -> dict[str, Any]:
        return self.build(**kwargs)


#: name -> DefenseSpec (a callable: ``DEFENSES.create(name, **kwargs)`` runs the builder)
DEFENSES: Registry[dict] = Registry("defense")


def register_defense(spec: DefenseSpec) -> DefenseSpec:
    """Register ``spec`` under ``spec.name`` in :data:`DEFENSES` and return it."""
    DEFENSES.register(spec.name)(spec)
    return spec


def defense_spec(name: str) -> DefenseSpec:
    """The :class:`DefenseSpec` registered as ``name`` (one-line error listing the known ones)."""
    spec = DEFENSES.get(name)
    assert isinstance(spec, DefenseSpec), f"{name} registered without a DefenseSpec"
    return spec


__all__ = ["DEFENSES", "DefenseSpec", "defense_spec", "register_defense"]
