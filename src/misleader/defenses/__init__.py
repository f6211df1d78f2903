"""Defenses: builders that turn a victim folder into a defended target folder.

A builder is called with keyword arguments (at least ``victim``, ``out``, ``data_dir``, ``seed``,
``device``) and returns the ``result.json`` dict of the folder it wrote; :func:`misleader.load_oracle`
opens that folder. ``DEFENSES.create(name, **kwargs)`` or ``build_defense(name, ...)`` runs one.

* ``misleader``: :func:`misleader.defenses.misleader.defend_misleader` (trained ensemble).
* ``undefended``: :func:`defend_undefended`, the victim itself (a manifest pointing at it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from misleader.defenses.base import DEFENSES, DefenseSpec, register_defense

log = logging.getLogger(__name__)


def _misleader(**kwargs: Any) -> dict[str, Any]:
    from misleader.defenses.misleader import defend_misleader

    return defend_misleader(**kwargs)


def defend_undefended(*, victim: str | Path, out: str | Path | None = None, **_: Any) -> dict[str, Any]:
    """The undefended baseline: the victim itself.

    Returns the victim's numbers in the defense result format (``test_accuracy`` =
    ``victim_test_accuracy``, ``fidelity`` 1, ``mean_l1_to_victim`` 0) with ``target`` = the victim
    folder. With ``out``, also writes ``out/manifest.json`` (one member: the victim's checkpoint, by
    absolute path) and ``out/result.json``, so ``load_oracle(out)`` answers exactly like the victim.
    Other keyword arguments (``members``, ``epochs``, ``seed`` ...) are accepted and ignored.
    """
    from misleader.training.checkpoint import read_sidecar
    from misleader.utils import read_json, write_json

    victim = Path(victim).resolve()
    meta = read_sidecar(victim)
    vres = read_json(victim / "result.json") if (victim / "result.json").exists() else {}
    acc = vres.get("test_accuracy")
    result = {"defense": "undefended", "target": str(victim), "test_accuracy": acc, "victim_test_accuracy": acc,
              "fidelity": 1.0, "mean_l1_to_victim": 0.0, "dataset": meta.get("dataset"),
              "members": [{"name": "victim", "arch": meta.get("arch"), "test_accuracy": acc}]}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        manifest = {"kind": "defense", "defense": "undefended", "dataset": meta["dataset"],
                    "num_classes": meta["num_classes"], "input_shape": meta["input_shape"],
                    "class_names": meta.get("class_names"), "split": meta.get("split", {}),
                    "combine": "mean_softmax",
                    "members": [{"name": "victim", "arch": meta.get("arch"), "checkpoint": str(victim / "model.json")}],
                    "victim": str(victim), "victim_sha256": meta.get("sha256")}
        write_json(out / "manifest.json", manifest)
        write_json(out / "result.json", result)
    return result


register_defense(DefenseSpec(name="misleader", build=_misleader, paper="https://arxiv.org/abs/2506.02362",
                             help="MISLEADER: ensemble of distilled members trained against an inner clone"))
register_defense(DefenseSpec(name="undefended", build=defend_undefended,
                             help="the victim itself, as a defense folder (baseline)"))


def build_defense(name: str, **kwargs: Any) -> dict[str, Any]:
    """Run the defense builder ``name`` (see :data:`DEFENSES`) with keyword arguments."""
    builder: Callable[..., dict] = DEFENSES.get(name)
    return builder(**kwargs)


def list_defenses() -> list[str]:
    return DEFENSES.names()


__all__ = ["DEFENSES", "DefenseSpec", "register_defense", "build_defense", "defend_undefended", "list_defenses"]
from misleader.defenses import adaptive_misinfo, grad2, mad, postprocess, randp  # noqa: E402,F401  (registers)
