"""training/victim.py and `misleader train-victim`: --out resumes only with the same settings; --force starts over."""

from __future__ import annotations

import json

import pytest

from misleader.cli import main
from misleader.errors import MisleaderError
from misleader.training.victim import RESUME_FILE, train_victim

KW = dict(dataset="digits", arch="lenet5_fifth", epochs=2, seed=0, device="cpu")


def _interrupt_after_epoch_1(monkeypatch, out):
    import misleader.training.train as tr

    real, calls = tr.predict_probs, {"n": 0}

    def interrupt(*a, **k):  # the second validation is epoch 2's: epoch 1 is saved
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr, "predict_probs", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_victim(out=out, **KW)
    monkeypatch.setattr(tr, "predict_probs", real)


def test_interrupted_run_resumes_only_with_the_same_settings(tmp_path, monkeypatch):
    out = tmp_path / "v"
    _interrupt_after_epoch_1(monkeypatch, out)
    assert (out / RESUME_FILE).exists() and (out / "fingerprint.json").exists()
    for other, key in (({"arch": "lenet5_half"}, "arch"), ({"epochs": 3}, "epochs"), ({"seed": 4}, "seed")):
        with pytest.raises(MisleaderError, match=rf"other settings \({key}: stored"):
            train_victim(out=out, **{**KW, **other})
    # the identical call resumes and gives the weights of an uninterrupted run
    res = train_victim(out=out, **KW)
    clean = train_victim(out=tmp_path / "clean", **KW)
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "clean" / "model.safetensors").read_bytes()
    assert res["test_accuracy"] == clean["test_accuracy"] and not (out / RESUME_FILE).exists()


def test_finished_run_is_returned_for_the_same_settings_and_force_retrains(tmp_path):
    out = tmp_path / "v"
    res = train_victim(out=out, **KW)
    # finished: the same call returns the stored result; another one is refused, --force retrains
    assert train_victim(out=out, **KW)["seconds"] == res["seconds"]
    with pytest.raises(MisleaderError, match="--force"):
        train_victim(out=out, **{**KW, "arch": "lenet5_half"})
    forced = train_victim(out=out, force=True, **{**KW, "arch": "lenet5_half"})
    assert forced["arch"] == "lenet5_half" and json.loads((out / "model.json").read_text())["arch"] == "lenet5_half"


def test_corrupt_resume_file_is_refused_and_force_gets_past_it(tmp_path, monkeypatch):
    out = tmp_path / "v"
    _interrupt_after_epoch_1(monkeypatch, out)
    (out / RESUME_FILE).write_bytes(b"\x00" * 40)
    with pytest.raises(MisleaderError, match=r"resume state .*resume\.safetensors is unreadable.*--force"):
        train_victim(out=out, **KW)
    res = train_victim(out=out, force=True, **KW)  # same settings: --force still starts over
    assert [r["epoch"] for r in json.loads((out / "history.json").read_text())] == [1, 2] and res["epochs"] == 2


def test_cli_refusal_is_one_line_and_force_flag_works(tmp_path, capsys):
    args = ["-q", "train-victim", "--dataset", "digits", "--arch", "lenet5_fifth", "--epochs", "1", "--device", "cpu",
            "--out", str(tmp_path / "v")]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args[:5], "lenet5_half", *args[6:]]) == 2
    err = capsys.readouterr().err.strip()
    assert "other settings (arch: stored 'lenet5_fifth', requested 'lenet5_half')" in err and "\n" not in err
    assert "Traceback" not in err
    assert main([*args[:5], "lenet5_half", *args[6:], "--force"]) == 0
    assert json.loads((tmp_path / "v" / "result.json").read_text())["arch"] == "lenet5_half"
