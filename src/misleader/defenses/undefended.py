"""The undefended baseline: a defense folder that serves exactly what its base serves (default: the victim).

Written through :func:`misleader.defenses.folder.write_defense_folder` with no step of its own, so the
folder references the victim by a relative path and its weights' sha256 (never by an absolute path
only) and ``load_oracle(out)`` answers exactly like the victim. ``--out`` may not be the victim folder,
nor any non-empty folder that a ``misleader defend undefended`` run with these settings did not write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from misleader.defenses.base import DefenseSpec, register_defense


def defend_undefended(*, victim: str | Path, out: str | Path | None = None, base: str | Path | None = None,
                      data_dir: str | Path | None = None, seed: int = 0, device: str = "cpu", force: bool = False,
                      **_: Any) -> dict[str, Any]:
    """Write the folder ``out`` serving ``base`` (default: the victim) unchanged; return its ``result.json``.

    Without ``out`` (the experiment runner's virtual baseline), writes nothing and returns the victim's
    recorded numbers in the defense result format (``fidelity`` 1, ``mean_l1_to_victim`` 0).
    Other keyword arguments (``members``, ``epochs`` ...) are accepted and ignored.
    """
    if out is None:
        from misleader.oracle.manifest import read_target
        from misleader.utils import read_json

        t = read_target(victim)
        folder = t.folder
        acc = read_json(folder / "result.json").get("test_accuracy") if (folder / "result.json").exists() else None
        return {"defense": "undefended", "target": str(folder), "test_accuracy": acc, "victim_test_accuracy": acc,
                "fidelity": 1.0, "mean_l1_to_victim": 0.0, "dataset": t.meta.get("dataset")}
    from misleader.defenses.folder import write_defense_folder

    return write_defense_folder(out=out, victim=victim, base=base, defense="undefended", steps=[], models=None,
                                params={}, seed=seed, data_dir=data_dir, device=device, force=force)


UNDEFENDED = register_defense(DefenseSpec(
    name="undefended", build=defend_undefended, help="the victim itself (or --base unchanged), as a defense folder",
    description="A defense folder that serves what --base serves (default: the victim) unchanged: the baseline. "
                "The victim is referenced by relative path and sha256, never copied.",
    test_params={}))

__all__ = ["UNDEFENDED", "defend_undefended"]
