"""Train a victim ("teacher") model and save it as a victim folder.

A victim folder holds ``model.safetensors`` + ``model.json`` (sidecar with arch, dataset, split,
normalisation, metrics, versions, sha256), ``history.json`` and ``result.json`` (``test_accuracy``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from misleader.data import SplitSpec, load_dataset, make_splits
from misleader.errors import MisleaderError
from misleader.fingerprint import check_out_dir
from misleader.metrics import accuracy
from misleader.models import MODELS, create_model
from misleader.training.checkpoint import save_model
from misleader.training.resume import claim_run_dir
from misleader.training.evaluate import predict_probs
from misleader.training.train import RECIPES, Recipe, default_recipe, train_classifier
from misleader.utils import environment, read_json, resolve_device, seed_everything, write_json

log = logging.getLogger(__name__)

RESUME_FILE = "resume.safetensors"


def train_victim(
    *,
    dataset: str,
    arch: str,
    epochs: int,
    out: str | Path,
    data_dir: str | Path | None = None,
    seed: int = 0,
    device: str = "auto",
    recipe: str | Recipe | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    split: SplitSpec | None = None,
    amp: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Train ``arch`` on ``dataset``'s defender split, select on validation, test once; write ``out``.

    ``out`` records a fingerprint of the settings (dataset, arch, epochs, seed, recipe, split, amp).
    Re-running with the same settings resumes an interrupted run after its last epoch (or returns
    the finished result); other settings are a one-line error unless ``force``, which starts over.

    Returns:
        The ``result.json`` dict (``test_accuracy``, ``val_accuracy``, ``seconds`` ...).

    Raises:
        MisleaderError: unknown arch/recipe/dataset, ``out`` written with other settings, or an
            unreadable resume file.
    """
    out = check_out_dir(out)
    MODELS.get(arch)  # fail fast on an unknown architecture
    dev = resolve_device(device)
    gen = seed_everything(seed)
    data = load_dataset(dataset, data_dir=data_dir)
    split = split or SplitSpec()
    s = make_splits(len(data.y_train), split)
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise MisleaderError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        recipe = RECIPES[recipe]
    recipe = recipe or default_recipe(dataset, data.in_channels)
    if batch_size is not None:
        recipe = replace(recipe, batch_size=batch_size)
    if lr is not None:
        recipe = replace(recipe, lr=lr)
    mean, std = data.channel_stats()
    settings = {"command": "train-victim", "dataset": dataset, "arch": arch, "epochs": epochs, "seed": seed,
                "recipe": recipe.to_dict(), "split": split.to_dict(), "amp": amp}
    resumed = claim_run_dir(out, settings, force=force, command="misleader train-victim")
    if resumed and (out / "result.json").exists() and (out / "model.json").exists():
        log.info("%s already holds this finished victim; pass --force to retrain", out)
        return read_json(out / "result.json")
    model = create_model(arch, in_channels=data.in_channels, num_classes=data.num_classes, mean=mean, std=std)
    t0 = time.perf_counter()
    res = train_classifier(
        model, x_train=data.x_train[s.train], y_train=data.y_train[s.train], x_val=data.x_train[s.val],
        y_val=data.y_train[s.val], epochs=epochs, recipe=recipe, device=dev, generator=gen,
        resume_path=out / RESUME_FILE, settings=settings, amp=amp, desc=f"victim {arch}",
    )
    model.load_state_dict(res.best_state)
    test_acc = accuracy(predict_probs(model, data.x_test, device=dev), data.y_test)
    result = {
        "test_accuracy": test_acc,
        "val_accuracy": res.best_val_accuracy,
        "best_epoch": res.best_epoch,
        "epochs": epochs,
        "dataset": dataset,
        "arch": arch,
        "seed": seed,
        "train_size": int(len(s.train)),
        "seconds": time.perf_counter() - t0,
        "device": str(dev),
    }
    meta = {
        "dataset": dataset, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
        "class_names": data.class_names, "seed": seed, "split": split.to_dict(), "recipe": recipe.to_dict(),
        "metrics": {"test_accuracy": test_acc, "val_accuracy": res.best_val_accuracy},
    }
    save_model(model, out, meta=meta)
    write_json(out / "history.json", res.history)
    write_json(out / "result.json", {**result, "environment": environment()})
    (out / RESUME_FILE).unlink(missing_ok=True)
    log.info("victim %s on %s: test accuracy %.4f (val %.4f, %.1fs)", arch, dataset, test_acc,
             res.best_val_accuracy, result["seconds"])
    return result


def load_target_data(meta: dict[str, Any], *, data_dir: str | Path | None = None):
    """The dataset and split recorded in a victim/defense sidecar: returns ``(Dataset, Splits)``."""
    data = load_dataset(meta["dataset"], data_dir=data_dir)
    split = SplitSpec(**meta.get("split", {}))
    return data, make_splits(len(data.y_train), split)


def victim_dataset_check(meta: dict[str, Any]) -> None:
    if "dataset" not in meta:
        raise MisleaderError("the folder's sidecar names no dataset: re-create it with `misleader train-victim`")


__all__ = ["train_victim", "load_target_data", "torch"]
