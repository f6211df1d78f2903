"""What the training-time baselines (MeCo, ACT, DNF) share: victim and data loading, presets, synthetic OOD
images, tensor files inside a defense folder, a small resumable epoch loop, and the extra result fields.

The epoch loop :func:`fit` takes a task with the same four methods as ``misleader.training.loop.FitTask``
(``run_epoch``, ``snapshot``, ``state_dict``, ``load_state_dict``) and the same keyword arguments as
``misleader.training.loop.fit``, so that it can be replaced by that one loop once both are on one branch
(it is kept local here because that loop lives on another branch). The resume state is written with
:func:`misleader.training.resume.save_resume_state` after every epoch and refused when it was written
with other settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from misleader.errors import MisleaderError
from misleader.utils import atomic_write_bytes, progress, write_json

log = logging.getLogger(__name__)
S = TypeVar("S")


# --------------------------------------------------------------------------- victim, data, presets

@dataclass
class VictimData:
    """The victim model and the splits a defender may train on (uint8 images, int64 labels)."""

    model: nn.Module
    meta: dict[str, Any]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def load_victim_data(victim: str | Path, *, data_dir: str | Path | None, device: torch.device) -> VictimData:
    """The victim (eval mode, on ``device``) and its dataset's defender train / validation splits."""
    from misleader.defenses.folder import _victim_ref
    from misleader.training.checkpoint import load_model
    from misleader.training.victim import load_target_data

    meta = _victim_ref(Path(victim))
    model, side = load_model(Path(victim), device=device, expect_sha256=meta.get("sha256"))
    data, s = load_target_data(side, data_dir=data_dir)
    return VictimData(model=model.eval(), meta=side, x_train=data.x_train[s.train], y_train=data.y_train[s.train],
                      x_val=data.x_train[s.val], y_val=data.y_train[s.val])


def resolve_preset(presets: Mapping[str, S], *, preset: str | None, in_channels: int,
                   overrides: Mapping[str, Any], what: str) -> tuple[str, S]:
    """The named preset (default: ``mnist-cpu`` for 1-channel victims, ``cifar10-paper`` otherwise) with the
    non-``None`` ``overrides`` applied; unknown names and keys are one-line errors."""
    name = preset or ("mnist-cpu" if in_channels == 1 else "cifar10-paper")
    if name not in presets:
        raise MisleaderError(f"unknown {what} preset {name!r}: choose one of {', '.join(presets)}")
    base = presets[name]
    known = {f.name for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    bad = sorted(set(overrides) - known)
    if bad:
        raise MisleaderError(f"{what}: unknown setting(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    return name, dataclasses.replace(base, **given)  # type: ignore


@dataclass(frozen=True)
class RecipeSettings:
    """The optimiser, schedule and augmentation fields of a training defense's settings (MeCo, ACT)."""

    epochs: int = 3
    batch_size: int = 64
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | step | constant
    milestones: tuple[float, ...] = (0.4, 0.6, 0.8)
    augment: str = "none"  # none | crop | crop_flip

    def recipe(self) -> Any:
        """These fields as a :class:`misleader.training.train.Recipe`."""
        from misleader.training.train import Recipe

        return Recipe(optimizer=self.optimizer, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                      batch_size=self.batch_size, schedule=self.schedule, milestones=tuple(self.milestones),
                      augment=self.augment)


def params_checker(presets: Mapping[str, Any], *, what: str) -> Any:
    """A ``check_params(*, preset=None, FIELD=None, ...)`` for a builder taking ``preset`` and ``**overrides``:
    its signature names every setting (what a YAML spec may give), and it raises a one-line
    :class:`MisleaderError` for an unknown preset or setting, or a value of the wrong kind."""
    import inspect

    proto = next(iter(presets.values()))
    kinds = {f.name: type(getattr(proto, f.name)) for f in dataclasses.fields(proto)}

    def check_params(**params: Any) -> None:
        preset = params.pop("preset", None)
        for k, v in params.items():
            want = kinds.get(k)
            if v is None or want is None or want is type(None):
                continue
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) if want in (int, float)
                  else isinstance(v, (list, tuple)) if want is tuple else isinstance(v, want))
            if not ok or (want is int and not isinstance(v, int)):
                raise MisleaderError(f"{what}: setting {k!r} must be a {want.__name__}, got {v!r}")
        resolve_preset(presets, preset=preset, in_channels=1 if preset is None else 0, overrides=params, what=what)

    names = ["preset", *kinds]
    check_params.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names])
    return check_params


def settings_dict(settings: Any) -> dict[str, Any]:
    """A preset dataclass as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(settings)))


# --------------------------------------------------------------------------- synthetic OOD images

def ood_images(n: int, *, shape: tuple[int, ...], generator: torch.Generator, device: torch.device,
               ngf: int = 64, nz: int = 256, batch_size: int = 128, noise: float = 1.0) -> torch.Tensor:
    """``n`` images in [0, 1] (n, C, H, W) from an *untrained* DFME generator (``GeneratorA``, train mode,
    output clamped to [-1, 1]) whose parameters get N(0, ``noise``^2) noise after each batch (ACT's OOD data)."""
    from misleader.models import GeneratorA, tanh_to_unit
    from misleader.utils import forked_rng

    c, h, _ = shape
    with forked_rng(generator, device):
        g = GeneratorA(nz=nz, ngf=ngf, img_size=h, nc=c).to(device).train()
    out = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            z = torch.randn(m, nz, generator=generator).to(device)
            out.append(tanh_to_unit(g(z).clamp(-1, 1)).cpu())
            for p in g.parameters():
                p.add_(torch.randn(p.shape, generator=generator).to(device) * noise)
    return torch.cat(out)


# --------------------------------------------------------------------------- tensor files in a defense folder

def save_tensors(module: nn.Module, *, out: Path, rel: str) -> dict[str, str]:
    """Write ``module``'s state dict to ``out/rel`` (safetensors, atomic); return ``{"file", "sha256"}``."""
    blob = st_save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    atomic_write_bytes(out / rel, blob)
    return {"file": rel, "sha256": hashlib.sha256(blob).hexdigest()}


def load_tensors(module: nn.Module, *, folder: Path, entry: Mapping[str, Any], where: str) -> None:
    """Load ``entry["file"]`` (inside ``folder``, checked against ``entry["sha256"]``) into ``module``."""
    from misleader.oracle.manifest import check_regular_file, inside

    path = inside(Path(folder).resolve(), entry.get("file"), Path(folder) / "manifest.json", f"{where}: file")
    sha = entry.get("sha256")
    if not isinstance(sha, str) or not sha:
        raise MisleaderError(f"{where}: 'sha256' of {path.name} is missing: re-create the folder")
    blob = check_regular_file(path, what=f"{where} weights").read_bytes()
    if hashlib.sha256(blob).hexdigest() != sha:
        raise MisleaderError(f"{where}: {path} does not match its sha256 in the manifest (corrupted or replaced): "
                             "re-create the folder")
    try:
        module.load_state_dict(st_load(blob))
    except (SafetensorError, RuntimeError) as exc:
        raise MisleaderError(f"{where}: {path} does not fit the step's settings ({str(exc)[:160]}): "
                             "re-create the folder") from None


# --------------------------------------------------------------------------- epoch loop

# one resumable epoch loop for the whole project: misleader.training.loop.fit (FitTask, FitResult)
from misleader.training.loop import FitResult, FitTask, fit  # noqa: E402


# --------------------------------------------------------------------------- supervised (re)training task

class RetrainTask:
    """A FitTask that trains ``modules`` with a defense's loss over the defender's training split.

    Subclasses implement :meth:`loss`; the optimiser, schedule and augmentation come from a
    :class:`misleader.training.train.Recipe` (one per-step schedule over the whole run). Each epoch ends with
    the clean validation accuracy of ``modules["model"]`` (selection) and, when ``served`` is given, the
    validation accuracy of ``served(x) -> logits`` (the model as it will answer, with its input step).
    """

    def __init__(self, *, modules: dict[str, nn.Module], data: VictimData, recipe: Any, epochs: int,
                 device: torch.device, generator: torch.Generator, served: Any = None) -> None:
        from misleader.data.loader import TensorLoader
        from misleader.training.train import make_optimizer, make_scheduler

        self.modules, self.data, self.recipe, self.device, self.g, self.served = modules, data, recipe, device, generator, served
        self.loader = TensorLoader(data.x_train, data.y_train, batch_size=recipe.batch_size, shuffle=True,
                                   generator=generator, device=device, drop_last=len(data.x_train) > recipe.batch_size)
        self.opt = make_optimizer([p for m in modules.values() for p in m.parameters()], recipe)
        self.sched = make_scheduler(self.opt, recipe, total_steps=epochs * len(self.loader))
        self.steps = 0

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of one batch (x (B, C, H, W) in [0, 1], y (B,)) and fields to average in the log."""
        raise NotImplementedError

    def run_epoch(self, epoch: int, *, bar: Any) -> dict[str, Any]:
        from misleader.training.train import crop_flip

        for m in self.modules.values():
            m.train()
        sums: dict[str, float] = {}
        n = 0
        for xb, yb in self.loader:
            if self.recipe.augment != "none":
                xb = crop_flip(xb, padding=self.recipe.crop_padding, flip=self.recipe.augment == "crop_flip",
                               generator=self.g)
            loss, fields = self.loss(xb, yb)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            self.steps += 1
            for k, v in {"train_loss": float(loss.detach()), **fields}.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            bar.update(1)
        for m in self.modules.values():
            m.eval()
        row: dict[str, Any] = {k: v / max(n, 1) for k, v in sums.items()}
        row["val_accuracy"] = self._val(self.modules["model"])
        if self.served is not None:
            row["val_accuracy_served"] = self._val(self.served)
        row["lr"] = self.opt.param_groups[0]["lr"]
        return row

    @torch.no_grad()
    def _val(self, f: Any) -> float:
        from misleader.data.loader import to_unit

        hits = sum(int((f(to_unit(c).to(self.device)).argmax(1).cpu() == yc).sum())
                   for c, yc in zip(self.data.x_val.split(1024), self.data.y_val.split(1024)))
        return hits / len(self.data.y_val)

    def snapshot(self) -> dict[str, Any]:
        return {k: {n: v.detach().cpu().clone() for n, v in m.state_dict().items()} for k, m in self.modules.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"modules": self.snapshot(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "gen": self.g.get_state(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.g.set_state(state["gen"])
        self.steps = int(state["steps"])


def model_stats(meta: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The victim's input normalisation as (1, C, 1, 1) tensors (mean, std)."""
    c = int(meta["input_shape"][0])
    mean = torch.tensor([float(v) for v in meta.get("mean", [0.0] * c)]).view(1, c, 1, 1).to(device)
    std = torch.tensor([float(v) for v in meta.get("std", [1.0] * c)]).view(1, c, 1, 1).to(device)
    return mean, std


def served_logits(model: torch.nn.Module, step: dict[str, Any], *, generator: torch.Generator,
                  mean: torch.Tensor, std: torch.Tensor) -> Any:
    """``x -> model(x')`` with ``x'`` from the ``random_perturbation`` entry ``step`` (validation only)."""
    from misleader.defenses.perturbation import random_perturb

    eps = None if step["eps"] is None else tuple(step["eps"])

    def f(x: torch.Tensor) -> torch.Tensor:
        return model(random_perturb(x, generator=generator, hidden=step["hidden"], eps=eps, norm=step["norm"],
                                    weight_noise=step["weight_noise"], scale=step["scale"], mean=mean, std=std))
    return f


# --------------------------------------------------------------------------- result.json extras

def finish_result(out: Path, result: dict[str, Any], *, extra: dict[str, Any], x_test: torch.Tensor,
                  device: torch.device, stochastic: bool) -> dict[str, Any]:
    """Add ``extra`` (training seconds, history ...) to ``result.json``; for a stochastic folder also
    ``mean_l1_between_answers``: the mean L1 between two answers of the folder to the same test images."""
    from misleader.metrics import mean_l1
    from misleader.oracle.load import load_oracle
    from misleader.training.evaluate import query_all

    result = dict(result, **extra)
    if stochastic:
        oracle = load_oracle(out, device=device)
        result["mean_l1_between_answers"] = mean_l1(query_all(oracle, x_test), query_all(oracle, x_test))
    write_json(out / "result.json", result)
    return result


__all__ = ["FitResult", "FitTask", "RetrainTask", "VictimData", "model_stats", "params_checker", "finish_result", "fit", "load_tensors",
           "load_victim_data", "ood_images", "RecipeSettings", "resolve_preset", "served_logits", "save_tensors", "settings_dict"]
