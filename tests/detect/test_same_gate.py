"""same-gate: a threshold above every score serves the base; below every score serves the branch or refuses."""

from __future__ import annotations

import json

import pytest
import torch

from misleader import load_oracle
from misleader.defenses.same_gate import build_same_gate
from misleader.detect.same import train_same
from misleader.errors import MisleaderError

X = torch.rand(12, 1, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def detectors(tiny_victim, tmp_path_factory):
    """A tiny detector, and copies of it whose threshold is above / below every score."""
    import shutil

    root = tmp_path_factory.mktemp("same")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_same(victim=tiny_victim, out=root / "det", device="cpu", preset="tiny", limit=200)
    finally:
        torch.set_num_threads(n)
    out = {}
    for name, thr in (("high", 1e9), ("low", -1e9)):
        shutil.copytree(root / "det", root / name)
        meta = json.loads((root / name / "detector.json").read_text())
        meta["threshold"] = thr
        (root / name / "detector.json").write_text(json.dumps(meta))
        out[name] = root / name
    return out


def test_threshold_above_every_score_equals_its_base(tiny_victim, detectors, tmp_path, one_thread):
    res = build_same_gate(victim=tiny_victim, out=tmp_path / "g", detector=str(detectors["high"]), refuse=True)
    assert res["flagged_test_fraction"] == 0.0 and res["fidelity"] == 1.0
    assert torch.equal(load_oracle(tmp_path / "g").query(X), load_oracle(tiny_victim).query(X))


def test_threshold_below_every_score_refuses_or_answers_from_then(tiny_victim, detectors, tmp_path, one_thread):
    from misleader.defenses.postprocess import build_post

    build_same_gate(victim=tiny_victim, out=tmp_path / "r", detector=str(detectors["low"]), refuse=True)
    assert torch.allclose(load_oracle(tmp_path / "r").query(X), torch.full((12, 10), 0.1))
    build_post(victim=tiny_victim, out=tmp_path / "post", op="reverse-sigmoid", beta=0.5, gamma=0.2)
    res = build_same_gate(victim=tiny_victim, out=tmp_path / "t", detector=str(detectors["low"]),
                          then=str(tmp_path / "post"))
    assert res["flagged_test_fraction"] == 1.0
    assert torch.allclose(load_oracle(tmp_path / "t").query(X), load_oracle(tmp_path / "post").query(X), atol=1e-6)


def test_tampered_detector_and_bad_arguments_are_refused(tiny_victim, detectors, tmp_path, one_thread):
    with pytest.raises(MisleaderError, match="exactly one"):
        build_same_gate(victim=tiny_victim, out=tmp_path / "x", detector=str(detectors["high"]))
    build_same_gate(victim=tiny_victim, out=tmp_path / "g", detector=str(detectors["high"]), refuse=True)
    (tmp_path / "g" / "same_detector" / "mae.safetensors").write_bytes(b"x")
    with pytest.raises(MisleaderError, match="sha256"):
        load_oracle(tmp_path / "g")
