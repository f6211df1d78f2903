"""Checkpoints, victim training, seeding, CLI error handling."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from misleader import MisleaderError, load_oracle
from misleader.metrics import accuracy, fidelity, kl_divergence, mean_l1
from misleader.models import create_model
from misleader.training.checkpoint import load_model, save_model
from misleader.training.victim import train_victim


@pytest.fixture(scope="module")
def digits_victim(tmp_path_factory):
    out = tmp_path_factory.mktemp("victim")
    res = train_victim(dataset="digits", arch="lenet5", epochs=30, out=out, seed=0, device="cpu")
    return out, res


def test_digits_victim_reaches_95_percent(digits_victim):
    out, res = digits_victim
    assert res["test_accuracy"] >= 0.95
    for f in ("model.safetensors", "model.json", "result.json", "history.json"):
        assert (out / f).exists()
    assert not (out / "resume.safetensors").exists()
    side = json.loads((out / "model.json").read_text())
    assert side["dataset"] == "digits" and side["arch"] == "lenet5" and len(side["sha256"]) == 64
    assert side["input_shape"] == [1, 32, 32] and side["num_classes"] == 10


def test_victim_folder_opens_as_oracle(digits_victim):
    out, res = digits_victim
    from misleader.data import load_dataset
    from misleader.data.loader import to_unit

    d = load_dataset("digits")
    o = load_oracle(out, output="labels", budget=len(d.y_test))
    acc = accuracy(o.query(to_unit(d.x_test)), d.y_test)
    assert acc == pytest.approx(res["test_accuracy"], abs=1e-6)
    assert o.remaining == 0


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    m = create_model("lenet5_half", in_channels=3, num_classes=7, mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6])
    save_model(m, tmp_path, meta={"dataset": "x", "num_classes": 7, "input_shape": [3, 32, 32]})
    m2, meta = load_model(tmp_path)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), m2(x))
    assert meta["mean"] == pytest.approx([0.1, 0.2, 0.3])


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    m = create_model("lenet5_fifth", in_channels=1, num_classes=10)
    path = save_model(m, tmp_path, meta={"dataset": "x", "num_classes": 10, "input_shape": [1, 32, 32]})
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(MisleaderError, match="corrupted"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(MisleaderError, match="not valid JSON"):
        load_model(tmp_path)


def test_same_seed_same_weights(tmp_path):
    kw = dict(dataset="digits", arch="lenet5_fifth", epochs=2, seed=3, device="cpu")
    train_victim(out=tmp_path / "a", **kw)
    train_victim(out=tmp_path / "b", **kw)
    train_victim(out=tmp_path / "c", **{**kw, "seed": 4})
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a != (tmp_path / "c" / "model.safetensors").read_bytes()


def test_metrics():
    p = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    q = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    assert accuracy(p, torch.tensor([0, 0])) == 0.5
    assert fidelity(p, q) == 1.0  # argmax of q row 0 is 0 (tie -> first)
    assert fidelity(p, 1 - p) == 0.0
    assert mean_l1(p, q) == pytest.approx(0.2)
    assert mean_l1(p, p) == 0 and kl_divergence(p, p) == pytest.approx(0, abs=1e-6)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "misleader", *args], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train-victim", "--dataset", "mnist", "--arch", "lenet5", "--epochs", "1", "--out", "{tmp}/o",
          "--data-dir", "{tmp}/nothing"], "--data-dir"),
        (["train-victim", "--dataset", "digits", "--arch", "lenet7", "--epochs", "1", "--out", "{tmp}/o"],
         "unknown architecture 'lenet7'"),
        (["train-victim", "--dataset", "imagenet", "--arch", "lenet5", "--epochs", "1", "--out", "{tmp}/o"],
         "unknown dataset"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, needle):
    r = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("misleader: error")]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_cli_corrupted_checkpoint_one_line(tmp_path):
    import os

    m = create_model("lenet5_fifth", in_channels=1, num_classes=10)
    path = save_model(m, tmp_path, meta={"dataset": "digits", "num_classes": 10, "input_shape": [1, 32, 32]})
    path.write_bytes(b"garbage")
    code = ("import sys; from misleader.cli import main; from misleader import load_oracle;"
            "from misleader.errors import MisleaderError\n"
            f"try:\n    load_oracle({str(tmp_path)!r})\nexcept MisleaderError as e:\n    print(e); sys.exit(2)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert r.returncode == 2 and "corrupted" in r.stdout and "Traceback" not in r.stderr
