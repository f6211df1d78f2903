"""Writing a defense folder (manifest format 2): the one writer every defense builder goes through.

:func:`write_defense_folder` composes: it starts from what ``base`` serves (default: the victim),
appends the builder's ``steps``, and writes::

    out/manifest.json      format 2 (models, steps, seed, victim reference, params, base)
    out/models/NAME/       model.json + model.safetensors: the base's models (copied in) and the builder's
    out/result.json        the WHOLE pipeline vs the victim on the test set, float32 (written last)
    out/fingerprint.json   the settings (a re-run with other settings is refused unless ``force``)

The victim is never copied: it is referenced by a path *relative to the folder* and the sha256 of its
weights (checked whenever the folder is opened), so a folder moved together with its victim keeps
working, and a changed victim is refused rather than silently served.

Builders that train (e.g. a surrogate) call :func:`claim_defense_out` first, with the same arguments,
so that the ``--out`` checks and the settings fingerprint happen before any work.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from misleader.errors import MisleaderError
from misleader.utils import environment, read_json, resolve_device, write_json

log = logging.getLogger(__name__)


def _digest(path: Path) -> str:
    from misleader.oracle.manifest import check_regular_file

    return hashlib.sha256(check_regular_file(path).read_bytes()).hexdigest()


def _victim_ref(victim: Path) -> dict[str, Any]:
    from misleader.oracle.manifest import read_target

    t = read_target(victim)
    if t.kind != "victim":
        raise MisleaderError(f"--victim {victim} is a defense folder: pass the victim folder (train-victim), and the "
                             "defense to wrap as --base")
    if not isinstance(t.meta.get("sha256"), str):
        raise MisleaderError(f"--victim {victim}: its model.json records no sha256 of the weights: re-create it with "
                             "`misleader train-victim`")
    return t.meta


def _check_out(out: Path, *, victim: Path, base: Path | None) -> None:
    r = out.resolve()
    for what, p in (("the victim", victim), ("the base", base)):
        if p is not None and (r == p.resolve() or p.resolve() in r.parents):
            raise MisleaderError(f"--out {out} is (inside) {what} folder {p}: pass a new folder")
    if (out / "model.json").exists() and not (out / "manifest.json").exists():
        raise MisleaderError(f"--out {out} is a victim folder: pass a new folder (it would be overwritten)")


def defense_settings(*, defense: str, victim: str | Path, base: str | Path | None, params: dict[str, Any],
                     seed: int) -> dict[str, Any]:
    """What identifies a defense run (its fingerprint): defense, victim weights, base manifest, params, seed."""
    victim = Path(victim)
    vmeta = _victim_ref(victim)
    return {"defense": defense, "victim_sha256": vmeta.get("sha256"),
            "base_manifest_sha256": None if base is None else _digest(Path(base) / "manifest.json"),
            "params": params, "seed": int(seed)}


def claim_defense_out(*, out: str | Path, victim: str | Path, base: str | Path | None, defense: str,
                      params: dict[str, Any], seed: int, force: bool) -> dict[str, Any] | None:
    """Check and claim ``out`` before a builder works; return the finished ``result.json`` if this very run is done.

    Raises:
        MisleaderError: ``out`` is the victim or base folder, a victim folder, a folder of another run (without
            ``force``), a non-empty folder not written by misleader, or not writable.
    """
    from misleader.fingerprint import claim_out_dir

    out, victim = Path(out), Path(victim)
    base = None if base is None or Path(base).resolve() == victim.resolve() else Path(base)
    _check_out(out, victim=victim, base=base)
    settings = defense_settings(defense=defense, victim=victim, base=base, params=params, seed=seed)
    resumed = claim_out_dir(out, settings, force=force, command=f"misleader defend {defense}")
    if resumed and (out / "result.json").exists() and (out / "manifest.json").exists():
        return read_json(out / "result.json")
    return None


def _copy_model(src_sidecar: Path, dst_dir: Path, *, expect_sha256: str | None) -> str:
    """Copy a checked checkpoint (sidecar + weights) into ``dst_dir``; return the weights' sha256."""
    from misleader.training.checkpoint import load_model

    _, meta = load_model(src_sidecar, expect_sha256=expect_sha256)  # integrity and sidecar checks
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src_sidecar.parent / meta["weights"], dst_dir / "model.safetensors")
    side = dict(meta, weights="model.safetensors")
    write_json(dst_dir / "model.json", side)
    return str(meta["sha256"])


def _compose(base_steps: list[dict[str, Any]], steps: list[dict[str, Any]], *, backend: dict[str, Any] | None,
             inputs: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """base inputs + ``inputs`` + (``backend`` or the base's backend) + the base's later steps + ``steps``."""
    b = [s.get("kind") for s in base_steps].index("backend")
    return ([dict(s) for s in base_steps[:b]] + [dict(s) for s in inputs or []]
            + [dict(backend if backend is not None else base_steps[b])]
            + [dict(s) for s in base_steps[b + 1:]] + [dict(s) for s in steps])


def write_defense_folder(*, out: str | Path, victim: str | Path, base: str | Path | None, defense: str,
                         steps: list[dict[str, Any]], models: dict[str, nn.Module] | None, params: dict[str, Any],
                         seed: int, data_dir: str | Path | None, device: str | torch.device,
                         force: bool, backend: dict[str, Any] | None = None,
                         inputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write the defense folder ``out``: what ``base`` (default: the victim) serves, then ``steps``.

    Args:
        out: the new folder.
        victim: the victim folder (its test set and answers are the reference of ``result.json``).
        base: a defense folder whose pipeline is wrapped (``None`` or the victim: wrap the victim).
        defense: the defense's registry name.
        steps: step entries appended after the base's (``{"kind": ..., "type": ..., ...}``).
        models: new models the steps name (zoo classifiers, saved under ``models/NAME/``).
        params: the builder's settings (recorded, and part of the fingerprint).
        seed: seeds the folder's generator (stochastic steps) and is part of the fingerprint.
        data_dir: dataset root for the test-set evaluation.
        device: where the evaluation runs.
        force: start over when ``out`` holds a run with other settings.
        backend: replaces the base's backend step (defenses that change the model itself: MeCo, ACT, DNF).
        inputs: input steps inserted after the base's input steps, before the backend.

    Returns:
        ``result.json``: ``test_accuracy``, ``victim_test_accuracy``, ``fidelity``, ``mean_l1_to_victim`` (of the
        whole pipeline vs the victim, float32), ``defense``, ``base``, ``params``, ``seed``, ``stochastic``.
    """
    from misleader.oracle.manifest import read_target
    from misleader.training.checkpoint import save_model
    from misleader.training.evaluate import evaluate_target
    from misleader.training.victim import load_target_data

    out, victim = Path(out), Path(victim)
    if base is not None and Path(base).resolve() == victim.resolve():
        base = None
    vmeta = _victim_ref(victim)
    src = read_target(base if base is not None else victim)
    if (src.num_classes, src.input_shape) != (int(vmeta["num_classes"]), tuple(vmeta["input_shape"])):
        raise MisleaderError(f"--base {base} serves {src.num_classes} classes of {list(src.input_shape)}, the victim "
                             f"{vmeta['num_classes']} of {vmeta['input_shape']}: pass a base built on this victim")
    vsha = str(vmeta["sha256"])
    if base is not None:
        ref = src.meta.get("victim")
        base_vsha = ref.get("sha256") if isinstance(ref, dict) else src.meta.get("victim_sha256")
        if base_vsha is not None and base_vsha != vsha:
            raise MisleaderError(f"--base {base} was built on another victim (sha256 {str(base_vsha)[:12]}... != "
                                 f"{vsha[:12]}...): pass the victim it was built on, or a base built on this one")
    claim_defense_out(out=out, victim=victim, base=base, defense=defense, params=params, seed=seed, force=force)
    table: dict[str, dict[str, Any]] = {}
    for name, ref in src.models.items():
        if ref.sidecar.resolve() == (victim.resolve() / "model.json") or name == "victim":
            if name != "victim" or (ref.sha256 is not None and ref.sha256 != vsha):
                raise MisleaderError(f"--base {base} serves another victim (or names a model 'victim'): pass a base "
                                     "built on this victim")
            continue  # the victim: referenced, never copied
        sha = _copy_model(ref.sidecar, out / "models" / name, expect_sha256=ref.sha256)
        table[name] = {"checkpoint": f"models/{name}/model.json", "arch": ref.arch, "sha256": sha}
    for name, model in (models or {}).items():
        if name in table or name == "victim" or not name or "/" in name or name.startswith("."):
            raise MisleaderError(f"defense {defense}: model name {name!r} is taken or invalid: name it uniquely")
        save_model(model, out / "models" / name, meta={
            "dataset": vmeta["dataset"], "num_classes": int(vmeta["num_classes"]),
            "input_shape": list(vmeta["input_shape"]), "class_names": vmeta.get("class_names"),
            "split": vmeta.get("split"), "seed": int(seed), "role": f"{defense} model"})
        sha = str(read_json(out / "models" / name / "model.json")["sha256"])
        table[name] = {"checkpoint": f"models/{name}/model.json", "arch": getattr(model, "arch", None), "sha256": sha}
    base_meta = None
    if base is not None:
        base_meta = {"defense": src.meta.get("defense"), "path": os.path.relpath(Path(base).resolve(), out.resolve())}
    manifest = {
        "format": 2, "kind": "defense", "defense": defense, "dataset": vmeta["dataset"],
        "num_classes": int(vmeta["num_classes"]), "input_shape": [int(s) for s in vmeta["input_shape"]],
        "class_names": vmeta.get("class_names"), "split": vmeta.get("split", {}), "seed": int(seed),
        "victim": {"path": os.path.relpath(victim.resolve(), out.resolve()), "sha256": vsha},
        "models": table, "steps": _compose(src.steps, steps, backend=backend, inputs=inputs),
        "params": params, "base": base_meta, "versions": environment(),
    }
    write_json(out / "manifest.json", manifest)
    dev = resolve_device(device)
    from misleader.oracle.load import open_accounted
    from misleader.oracle.steps import STEPS

    open_accounted(out, device=dev)  # builds every step: a bad entry fails here, before result.json
    stochastic = any(STEPS.get(s["type"]).stochastic for s in manifest["steps"])
    data, _ = load_target_data(vmeta, data_dir=data_dir)
    ev = evaluate_target(target=out, victim=victim, x_test=data.x_test, y_test=data.y_test, device=dev)
    result = {**ev, "defense": defense, "dataset": vmeta["dataset"], "base": base_meta, "params": params,
              "seed": int(seed), "stochastic": stochastic, "steps": [s.get("type") for s in manifest["steps"]],
              "environment": environment(),
              "notes": "whole pipeline vs the victim on the test set, float32 (one pass: stochastic steps draw "
                       "from the folder's seeded generator)"}
    write_json(out / "result.json", result)  # last: a folder with result.json is finished
    log.info("%s %s: test accuracy %.4f (victim %.4f), fidelity %.4f, mean L1 %.4f", defense, out,
             result["test_accuracy"], result["victim_test_accuracy"], result["fidelity"], result["mean_l1_to_victim"])
    return result


__all__ = ["claim_defense_out", "defense_settings", "write_defense_folder"]
