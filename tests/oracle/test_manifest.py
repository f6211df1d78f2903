"""Target folders: format-1 folders answer bit-identically; bad manifests and sidecars are one-line errors."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from misleader import MisleaderError, load_oracle
from misleader.models import create_model
from misleader.oracle.manifest import read_target
from misleader.training.checkpoint import read_sidecar, save_model

META = {"dataset": "digits", "num_classes": 10, "input_shape": [1, 32, 32]}


def _save(d: Path, seed: int, *, k: int = 10, arch: str = "lenet5_fifth") -> torch.nn.Module:
    torch.manual_seed(seed)
    m = create_model(arch, in_channels=1, num_classes=k).eval()
    save_model(m, d, meta={**META, "num_classes": k})
    return m


def _format1(folder: Path, *, weights=None, k: int = 10) -> list[torch.nn.Module]:  # noqa: ANN001
    """A MISLEADER folder written the way defend_misleader wrote it before manifest format 2."""
    members = [_save(folder / "members" / n, s, arch=a)
               for n, s, a in (("lenet5_fifth", 1, "lenet5_fifth"), ("lenet5_half", 2, "lenet5_half"),
                               ("lenet5_fifth_2", 3, "lenet5_fifth"))]
    manifest = {"kind": "defense", "defense": "misleader", "dataset": "digits", "num_classes": k,
                "input_shape": [1, 32, 32], "class_names": None, "split": {}, "combine": "mean_softmax",
                "members": [{"name": n, "arch": a, "checkpoint": f"members/{n}/model.json", "lambda": 0.1}
                            for n, a in (("lenet5_fifth", "lenet5_fifth"), ("lenet5_half", "lenet5_half"),
                                         ("lenet5_fifth_2", "lenet5_fifth"))],
                "victim": "/somewhere/else", "victim_sha256": None, "seed": 0}
    if weights is not None:
        manifest["weights"] = weights
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return members


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_format1_folder_answers_bit_identically(tmp_path, weights):
    members = _format1(tmp_path, weights=weights)
    x = torch.rand(17, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    w = torch.ones(3) if weights is None else torch.tensor(weights)
    w = w / w.sum()
    with torch.inference_mode():  # the soft vote exactly as EnsembleOracle computed it before format 2
        expected = None
        for wi, m in zip(w, members):
            p = torch.softmax(m(x.float()).float(), dim=1) * wi
            expected = p if expected is None else expected + p
    got = load_oracle(tmp_path).query(x)
    assert torch.equal(got, expected)
    assert torch.equal(load_oracle(tmp_path, output="labels").query(x), expected.argmax(1))


def test_format1_undefended_folder_with_absolute_victim_path(tmp_path):
    """The old undefended folder: one member by absolute path, accepted as the explicit victim reference."""
    v = _save(tmp_path / "victim", 0)
    sha = read_sidecar(tmp_path / "victim")["sha256"]
    (tmp_path / "u").mkdir()
    manifest = {"kind": "defense", "defense": "undefended", **META, "combine": "mean_softmax",
                "members": [{"name": "victim", "checkpoint": str((tmp_path / "victim" / "model.json").resolve())}],
                "victim": str((tmp_path / "victim").resolve()), "victim_sha256": sha}
    (tmp_path / "u" / "manifest.json").write_text(json.dumps(manifest))
    x = torch.rand(4, 1, 32, 32)
    with torch.inference_mode():
        assert torch.equal(load_oracle(tmp_path / "u").query(x), torch.softmax(v(x), 1))
    manifest["victim_sha256"] = "0" * 64  # the victim changed: refused
    (tmp_path / "u" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MisleaderError, match="not the one the manifest names"):
        load_oracle(tmp_path / "u")


BAD_V1 = [
    ({"num_classes": "ten"}, "num_classes"),
    ({"num_classes": True}, "num_classes"),
    ({"input_shape": None}, "input_shape"),
    ({"members": []}, "members"),
    ({"weights": "."}, "weights"),
    ({"weights": [1, 1]}, "weights"),
    ({"weights": [1, -1, 1]}, "weights"),
    ({"num_classes": 5}, "5"),
    ({"combine": "max"}, "combine"),
    ({"format": 7}, "format"),
    ({"dataset": 3}, "dataset"),
]


@pytest.mark.parametrize("change, match", BAD_V1)
def test_bad_manifest_values_are_one_line_errors(tmp_path, change, match):
    _format1(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m.update(change)
    if change.get("input_shape", 0) is None:
        del m["input_shape"]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MisleaderError, match=match) as e:
        load_oracle(tmp_path).query(torch.rand(2, 1, 32, 32))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("checkpoint", ["../outside/model.json", "members/../../outside/model.json",
                                        "/etc/passwd", "ABS"])
def test_member_paths_may_not_leave_the_folder(tmp_path, checkpoint):
    d = tmp_path / "d"
    _format1(d)
    _save(tmp_path / "outside", 9)
    m = json.loads((d / "manifest.json").read_text())
    m["members"][0]["checkpoint"] = str(tmp_path / "outside" / "model.json") if checkpoint == "ABS" else checkpoint
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MisleaderError, match="leaves the folder|outside"):
        read_target(d)


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    d = tmp_path / "d"
    _format1(d)
    _save(tmp_path / "outside", 9)
    os.symlink(tmp_path / "outside", d / "members" / "link")
    m = json.loads((d / "manifest.json").read_text())
    m["members"][0]["checkpoint"] = "members/link/model.json"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MisleaderError, match="outside"):
        read_target(d)


def test_fifo_weights_do_not_hang(tmp_path):
    _format1(tmp_path)
    w = tmp_path / "members" / "lenet5_half" / "model.safetensors"
    w.unlink()
    os.mkfifo(w)
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("hung on a FIFO")))
    signal.alarm(10)
    try:
        with pytest.raises(MisleaderError, match="not a regular file"):
            load_oracle(tmp_path)
    finally:
        signal.alarm(0)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.pop("sha256"), "no sha256"),
    (lambda s: s.update(num_classes="ten"), "num_classes"),
    (lambda s: s.update(weights="../../x.safetensors"), "file name in its folder"),
    (lambda s: s.pop("input_shape"), "input_shape"),
])
def test_bad_sidecars_are_refused(tmp_path, edit, match):
    _format1(tmp_path)
    side = tmp_path / "members" / "lenet5_half" / "model.json"
    s = json.loads(side.read_text())
    edit(s)
    side.write_text(json.dumps(s))
    with pytest.raises(MisleaderError, match=match):
        load_oracle(tmp_path)


def test_format2_unknown_step_lists_the_known_ones(tmp_path):
    _save(tmp_path / "models" / "a", 0)
    sha = read_sidecar(tmp_path / "models" / "a")["sha256"]
    m = {"format": 2, "kind": "defense", "defense": "x", **META, "seed": 0,
         "models": {"a": {"checkpoint": "models/a/model.json", "sha256": sha}},
         "steps": [{"kind": "backend", "type": "model", "model": "a"}, {"kind": "output", "type": "nonesuch"}]}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MisleaderError, match=r"unknown pipeline step 'nonesuch'.*choose one of: .*ensemble.*model"):
        load_oracle(tmp_path)
    m["steps"] = [{"kind": "backend", "type": "model", "model": "b"}]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MisleaderError, match="does not declare"):
        load_oracle(tmp_path)
    m["steps"], m["models"]["a"]["sha256"] = [{"kind": "backend", "type": "model", "model": "a"}], "f" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MisleaderError, match="not the one the manifest names"):
        load_oracle(tmp_path)
