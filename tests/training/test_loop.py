"""training/loop.py: the one fit loop (selection, early stopping, kill-and-resume, refused resumes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from misleader.errors import MisleaderError
from misleader.models import create_model
from misleader.training.loop import fit
from misleader.training.train import RECIPES, train_classifier


class _Scripted:
    """A task whose validation accuracy follows a script; its "weights" count the epochs trained."""

    def __init__(self, accs: list[float]) -> None:
        self.accs, self.w = accs, torch.zeros(1)

    def run_epoch(self, epoch: int, *, bar) -> dict:
        self.w += 1
        bar.update(1)
        return {"val_accuracy": self.accs[epoch]}

    def snapshot(self) -> dict:
        return {"w": self.w.clone()}

    def state_dict(self) -> dict:
        return {"w": self.w}

    def load_state_dict(self, state: dict) -> None:
        self.w = state["w"].clone()


def test_selects_the_first_best_epoch_and_stops_after_patience():
    res = fit(_Scripted([0.1, 0.5, 0.5, 0.3, 0.4, 0.9]), epochs=6, steps_per_epoch=1, patience=3)
    assert res.best_epoch == 2 and res.best_val_accuracy == 0.5 and float(res.best["w"]) == 2
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4, 5]  # 3 epochs without improvement after epoch 2
    full = fit(_Scripted([0.1, 0.5, 0.5, 0.3, 0.4, 0.9]), epochs=6, steps_per_epoch=1)  # patience 0: never early
    assert full.best_epoch == 6 and full.epochs_run == 6


def test_scripted_kill_and_resume_keeps_counters(tmp_path):
    accs = [0.1, 0.5, 0.2, 0.2, 0.2, 0.2]

    def kill_at(n):
        def hook(row):  # on_epoch runs before the epoch is saved: epoch n is lost, as in a kill
            if row["epoch"] == n:
                raise KeyboardInterrupt
        return hook

    with pytest.raises(KeyboardInterrupt):
        fit(_Scripted(accs), epochs=6, steps_per_epoch=1, patience=3, resume_path=tmp_path / "r.safetensors",
            on_epoch=kill_at(4))
    res = fit(_Scripted(accs), epochs=6, steps_per_epoch=1, patience=3, resume_path=tmp_path / "r.safetensors")
    want = fit(_Scripted(accs), epochs=6, steps_per_epoch=1, patience=3)
    assert [r["epoch"] for r in res.history] == [r["epoch"] for r in want.history] == [1, 2, 3, 4, 5]
    assert res.best_epoch == want.best_epoch == 2 and torch.equal(res.best["w"], want.best["w"])


def _tiny(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 32, 32, generator=g) * 255).to(torch.uint8), torch.randint(0, 10, (n,), generator=g)


def _classifier(epochs: int, resume: Path | None, *, on_epoch=None, settings=None, recipe="adam"):
    x, y = _tiny(64, 0)
    xv, yv = _tiny(16, 1)
    torch.manual_seed(0)
    model = create_model("lenet5_fifth", in_channels=1, num_classes=10)
    gen = torch.Generator().manual_seed(1)
    res = train_classifier(model, x_train=x, y_train=y, x_val=xv, y_val=yv, epochs=epochs,
                           recipe=RECIPES[recipe].__class__(**{**RECIPES[recipe].to_dict(), "batch_size": 16}),
                           device=torch.device("cpu"), generator=gen, resume_path=resume, on_epoch=on_epoch,
                           settings=settings)
    return res, model


def _stop_after_epoch_1(row):
    if row["epoch"] == 2:
        raise KeyboardInterrupt


def test_killed_and_resumed_training_equals_an_uninterrupted_run(tmp_path):
    full, full_model = _classifier(3, None)
    with pytest.raises(KeyboardInterrupt):
        _classifier(3, tmp_path / "r.safetensors", on_epoch=_stop_after_epoch_1)
    assert (tmp_path / "r.safetensors").exists()
    resumed, resumed_model = _classifier(3, tmp_path / "r.safetensors")
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert [r["val_accuracy"] for r in resumed.history] == [r["val_accuracy"] for r in full.history]
    assert all(torch.equal(full.best_state[k], resumed.best_state[k]) for k in full.best_state)
    final, again = full_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(final[k], again[k]) for k in final)  # optimiser, schedule and shuffles resumed exactly


def test_resume_with_other_settings_or_a_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "r.safetensors"
    with pytest.raises(KeyboardInterrupt):
        _classifier(3, path, on_epoch=_stop_after_epoch_1, settings={"seed": 0})
    with pytest.raises(MisleaderError, match="other settings"):
        _classifier(3, path, settings={"seed": 4})
    with pytest.raises(MisleaderError, match="other settings"):
        _classifier(4, path, settings={"seed": 0})  # another number of epochs
    with pytest.raises(MisleaderError, match="other settings"):
        _classifier(3, path, settings={"seed": 0}, recipe="sgd-cosine")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MisleaderError, match=r"unreadable.*--force"):
        _classifier(3, path, settings={"seed": 0})
