"""same-gate: answer queries the SAME detector flags from another defense, or refuse them.

Paper: Xie et al., "SAME: Sample Reconstruction against Model Extraction Attacks", AAAI 2024,
https://arxiv.org/abs/2312.10578 (notes: ``shared/research/pow-same.md`` B5, composition 1 and 3).

A hard ``gate`` step (type ``same``): rows whose SAME score (:mod:`misleader.detect.same`) is at or below the
detector's calibrated threshold keep the base's answer; rows above it get

* ``--then X``: what defense folder ``X`` serves (e.g. MISLEADER's ensemble, MAD, labels-only), evaluated on
  those rows only: X's steps become the gate's branch and X's models are copied into the folder;
* ``--refuse``: a *refusal*, encoded as the uniform row 1/K (an oracle must answer a simplex row; a
  server may map it to an HTTP refusal). In labels mode a uniform row's top-1 is class 0.

The score uses the *victim's* probabilities (the model behind the base), as SAME defines it, not the base's
possibly perturbed answer. The detector (MAE + auxiliary classifier) is copied into ``same_detector/``
inside the folder and checked by sha256 when the folder opens. Without ``--detector`` the builder trains
one on the victim's defender split (``--preset``).

Deviations from the reference code: the reference only logs scores (no threshold, no gate); the gate
and its refusal encoding are ours, following the paper's statement that SAME composes with
reject-prediction defenses.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from misleader.defenses.base import DefenseSpec, register_defense
from misleader.errors import MisleaderError
from misleader.oracle.steps import GateStep, StepContext, register_step

log = logging.getLogger(__name__)

DETECTOR_DIR = "same_detector"


@register_step
class SameGate(GateStep):
    """Hard gate on the SAME score: ``weight = 1[score(x) > threshold]``; branch = ``then`` steps or uniform.

    Manifest entry: ``{"kind": "gate", "type": "same", "detector": "same_detector", "detector_sha256": str,
    "threshold": float, "alpha": float, "victim": "victim", "then": [step entries] | null}``.

    Shapes: ``weight(probs (N, K), x (N, C, H, W)) -> (N,)`` in {0, 1}; ``branch(x (N', C, H, W)) -> (N', K)``.
    """

    type_name: ClassVar[str] = "same"
    hard: ClassVar[bool] = True
    stochastic: ClassVar[bool] = False
    #: needs a detector folder inside the defense folder: covered by tests/detect/test_same_gate.py instead
    test_spec: ClassVar[dict[str, Any] | None] = None

    def __init__(self, *, detector, detector_dir: str, detector_sha256: str, then: list[dict[str, Any]] | None,  # noqa: ANN001
                 branch_fn=None, victim_name: str = "victim", num_classes: int) -> None:  # noqa: ANN001
        self.detector = detector
        self.detector_dir, self.detector_sha256 = detector_dir, detector_sha256
        self.then, self._branch, self.victim_name = then, branch_fn, victim_name
        self.num_classes = int(num_classes)

    @classmethod
    def from_manifest(cls, spec: dict[str, Any], *, ctx: StepContext) -> "SameGate":
        from misleader.detect.same import DETECTOR_FILE, SameDetector, load_detector_parts
        from misleader.oracle.manifest import inside

        where = ctx.folder / "manifest.json"
        for key in ("detector", "detector_sha256", "threshold", "alpha"):
            if key not in spec:
                raise MisleaderError(f"same gate: missing key {key!r} in the manifest entry: re-create the folder")
        folder = inside(ctx.folder.resolve(), spec["detector"], where, "detector")
        digest = hashlib.sha256((folder / DETECTOR_FILE).read_bytes()).hexdigest() if (folder / DETECTOR_FILE).is_file() else None
        if digest != spec["detector_sha256"]:
            raise MisleaderError(f"{folder / DETECTOR_FILE} is missing or not the detector the manifest names (sha256): "
                                 "re-create the folder with `misleader defend same-gate`")
        mae, aux, _ = load_detector_parts(folder, device=ctx.device)
        victim_name = str(spec.get("victim", "victim"))
        det = SameDetector(mae=mae, aux=aux, victim=ctx.load_model(victim_name), alpha=float(spec["alpha"]),
                           threshold=float(spec["threshold"]))
        then = spec.get("then")
        if then is not None and (not isinstance(then, list) or not then):
            raise MisleaderError("same gate: 'then' must be a non-empty list of step entries or null: re-create the folder")
        if then is not None and ctx.build_branch is None:
            raise MisleaderError("same gate: this context cannot build branch pipelines")
        return cls(detector=det, detector_dir=spec["detector"], detector_sha256=spec["detector_sha256"], then=then,
                   branch_fn=ctx.build_branch(then) if then is not None else None, victim_name=victim_name,
                   num_classes=ctx.num_classes)

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": "gate", "type": self.type_name, "detector": self.detector_dir,
                "detector_sha256": self.detector_sha256, "threshold": self.detector.threshold,
                "alpha": self.detector.alpha, "victim": self.victim_name, "then": self.then}

    def describe(self) -> dict[str, Any]:
        return {"kind": "gate", "type": self.type_name, "then": "defense" if self.then else "refuse"}

    def weight(self, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (self.detector.score(x) > self.detector.threshold).float().to(probs.device)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        if self._branch is None:
            return torch.full((len(x), self.num_classes), 1.0 / self.num_classes, device=x.device)
        return self._branch(x)


# --------------------------------------------------------------------------- the builder


def _then_parts(then: Path, *, victim_sha: str, taken: dict[str, str | None],
                device: torch.device) -> tuple[list[dict[str, Any]], dict[str, nn.Module]]:
    """The steps and (not yet present) models of defense folder ``then``, checked to be built on this victim."""
    from misleader.oracle.manifest import read_target
    from misleader.oracle.pipeline import model_loader

    t = read_target(then)
    if t.kind != "defense":
        raise MisleaderError(f"--then {then} is a victim folder: pass a defense folder (or --refuse)")
    vs = t.models.get("victim")
    if vs is not None and vs.sha256 != victim_sha:
        raise MisleaderError(f"--then {then} was built on another victim: pass a defense folder built on this one")
    load = model_loader(t, device=device)
    models: dict[str, nn.Module] = {}
    for name, ref in t.models.items():
        if name == "victim":
            continue
        if name in taken:
            if taken[name] != ref.sha256:
                raise MisleaderError(f"--then {then} and the base both have a model named {name!r} with other weights: "
                                     "rebuild one of them under another name")
            continue
        models[name] = load(name)
    return [dict(s) for s in t.steps], models


def build_same_gate(*, victim, base=None, out, data_dir=None, seed: int = 0, device: str = "cpu",  # noqa: ANN001
                    force: bool = False, detector: str | None = None, then: str | None = None, refuse: bool = False,
                    preset: str = "mnist-cpu", mae_epochs: int | None = None, aux_epochs: int | None = None,
                    limit: int | None = None) -> dict[str, Any]:
    """Gate ``base`` (or the victim) with a SAME detector; flagged rows go to ``then`` or are refused (uniform)."""
    from misleader.defenses.folder import claim_defense_out
    from misleader.defenses.output_builder import finish_output_defense
    from misleader.detect.same import DETECTOR_FILE, copy_detector, load_detector, read_detector_meta, train_same
    from misleader.oracle.manifest import read_target
    from misleader.training.victim import load_target_data
    from misleader.utils import read_json, resolve_device, write_json

    if (then is None) == (not refuse):
        raise MisleaderError("same-gate: pass exactly one of --then DEFENSE_FOLDER or --refuse")
    victim, out = Path(victim), Path(out)
    vt = read_target(victim)
    vsha = vt.models["victim"].sha256
    det_sha = None
    if detector is not None:
        dmeta = read_detector_meta(detector)
        if (dmeta.get("victim") or {}).get("sha256") != vsha:
            raise MisleaderError(f"--detector {detector} was trained for another victim: train one for this victim "
                                 "with `misleader detect same train`")
        det_sha = hashlib.sha256((Path(detector) / DETECTOR_FILE).read_bytes()).hexdigest()
    then_sha = None if then is None else hashlib.sha256(read_target(then).folder.joinpath("manifest.json").read_bytes()).hexdigest()
    params = {"detector_sha256": det_sha, "then_manifest_sha256": then_sha, "refuse": bool(refuse),
              "preset": None if detector else preset, "mae_epochs": mae_epochs, "aux_epochs": aux_epochs,
              "limit": limit}
    done = claim_defense_out(out=out, victim=victim, base=base, defense="same-gate", params=params, seed=seed,
                             force=force)
    if done is not None:
        return done
    dev = resolve_device(device)
    if detector is None:
        with tempfile.TemporaryDirectory() as tmp:
            train_same(victim=victim, out=Path(tmp) / "d", data_dir=data_dir, seed=seed, device=str(dev),
                       preset=preset, mae_epochs=mae_epochs, aux_epochs=aux_epochs, limit=limit)
            copy_detector(Path(tmp) / "d", out / DETECTOR_DIR)
    else:
        copy_detector(detector, out / DETECTOR_DIR)
    dmeta = read_detector_meta(out / DETECTOR_DIR)
    base_t = read_target(base if base is not None else victim)
    steps, models = (None, {}) if then is None else _then_parts(
        Path(then), victim_sha=vsha, taken={n: r.sha256 for n, r in base_t.models.items()}, device=dev)
    entry = {"kind": "gate", "type": "same", "detector": DETECTOR_DIR,
             "detector_sha256": hashlib.sha256((out / DETECTOR_DIR / DETECTOR_FILE).read_bytes()).hexdigest(),
             "threshold": float(dmeta["threshold"]), "alpha": float(dmeta["alpha"]), "victim": "victim", "then": steps}
    result = finish_output_defense(defense="same-gate", steps=[entry], models=models, params=params, victim=victim,
                                   base=base, out=out, data_dir=data_dir, seed=seed, device=str(dev), force=force)
    from misleader.training.checkpoint import load_model

    vmodel, _ = load_model(vt.models["victim"].sidecar, device=dev, expect_sha256=vsha)
    det = load_detector(out / DETECTOR_DIR, device=dev, victim=vmodel)
    data, _ = load_target_data(vt.meta, data_dir=data_dir)
    from misleader.detect.same import score_u8

    flagged = score_u8(det, data.x_test) > det.threshold
    result = dict(read_json(out / "result.json"), flagged_test_fraction=float(flagged.double().mean()),
                  threshold=det.threshold, branch="refuse (uniform 1/K)" if refuse else str(then))
    write_json(out / "result.json", result)
    return result


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from misleader.detect.same import PRESETS

    p.add_argument("--detector", default=None, metavar="S",
                   help="SAME detector folder (detect same train); default: train one here with --preset")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--then", default=None, metavar="X", help="defense folder that answers the flagged rows")
    g.add_argument("--refuse", action="store_true", help="refuse flagged rows (answer the uniform row 1/K)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="mnist-cpu", help="detector preset when training one")


def _params(a: argparse.Namespace) -> dict[str, Any]:
    return {"detector": a.detector, "then": a.then, "refuse": a.refuse, "preset": a.preset}


register_defense(DefenseSpec(
    name="same-gate", build=build_same_gate, add_arguments=_add_arguments, params_from_args=_params,
    paper="https://arxiv.org/abs/2312.10578",
    test_params={"refuse": True, "preset": "tiny", "limit": 200},
    help="SAME gate: rows the SAME detector flags go to another defense (--then X) or are refused (uniform 1/K)",
    description=__doc__ or ""))
