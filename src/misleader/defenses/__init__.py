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
from typing import Any, Callable, Sequence

from misleader.defenses.base import DEFENSES, DefenseSpec, register_defense

log = logging.getLogger(__name__)


def _misleader(**kwargs: Any) -> dict[str, Any]:
    from misleader.defenses.misleader import defend_misleader

    return defend_misleader(**kwargs)



def _check_misleader(*, members: Sequence[str], epochs: int, preset: str | None = None,
                     member_settings: Sequence[dict] | None = None, batch_size: int | None = None) -> None:
    """Validate MISLEADER's spec settings without training (preset, member settings' names and types);
    its keyword parameters are the settings a spec entry may give (:func:`misleader.experiments.spec.defense_params`)."""
    import typing

    from misleader.defenses.misleader import _ALIASES, MemberConfig, get_preset, member_config
    from misleader.errors import MisleaderError
    from misleader.experiments.spec import check_value

    pre = get_preset(preset) if preset is not None else None
    if member_settings is not None and len(member_settings) != len(members):
        raise MisleaderError(f"member_settings has {len(member_settings)} entries for {len(members)} members: "
                             "give one per member")
    hints = typing.get_type_hints(MemberConfig)
    for i, arch in enumerate(members):
        overrides = {**(member_settings[i] if member_settings else {}),
                     **({"batch_size": batch_size} if batch_size is not None else {})}
        for key, value in overrides.items():  # types first: MemberConfig's own checks assume numbers
            name = _ALIASES.get(key, key)
            if name in hints and value is not None:
                check_value(value, hints[name], f"member_settings[{i}].{name}")
        try:
            member_config(arch, epochs=epochs, preset=pre, overrides=overrides)
        except ValueError as exc:
            raise MisleaderError(f"member_settings[{i}]: {exc}") from None


_misleader.check_params = _check_misleader  # type: ignore[attr-defined]  (spec validation, see experiments.spec)


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
