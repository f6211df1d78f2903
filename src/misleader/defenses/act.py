"""ACT: Bayesian active watermarking (Wang, Wu & Huang, ICML 2024, "Defense against Model Extraction Attack by
Bayesian Active Watermarking", https://proceedings.mlr.press/v235/wang24cb.html; reference
``joey-wang123/Bayes-Active-Watermark``, ``teacher-train/teacher-finetune-AW.py``, served by
``DFME/dfme/train_cifar10_AW.py`` with ``network/resnet_8x_w.py``).

The victim is *fine-tuned* together with a learnable watermark network ``W`` (MeCo's two-block net,
:class:`misleader.defenses.perturbation.WatermarkNet`, with ``eps ~ U[0.3, 0.6]``); ``f_W(x) = f(x + scale W(x))``
(normalised units). Synthetic out-of-distribution images come from an **untrained** DFME generator
(``GeneratorA``) whose parameters get N(0, 1) noise after every step. Per step:

* even steps: ``CE(f_W(x), y) - alpha CE(softmax(f(x_ood)), f_W(x_ood))`` (keep utility on watermarked
  in-distribution data, change the outputs on watermarked OOD data);
* odd steps: ``CE(f_W(x), y)``.

Served as released: a **freshly sampled random** watermark network per query batch (the "posterior sample":
random weights with Gaussian weight noise of the weights' own std, BatchNorm in eval mode with reset
statistics, i.e. no normalisation: ``random_perturbation`` with ``weight_noise`` 1 and ``norm`` ``none``) in
front of the fine-tuned model. ``serve="trained"`` serves the trained ``W`` instead (``trained_watermark``).

Deviations from the reference code:
    * The WGF particle step on the watermark outputs is omitted: with its bandwidth ``h = 0.1 median^2 /
      ln(n + 1)`` the kernel is nearly diagonal and the step amounts to about 0.2x extra gradient on the
      watermark path (``../shared/research/defenses.md`` section 4).
    * The OOD term's target is the *softmax* of ``f(x_ood)`` (detached); the reference passes raw logits as
      the soft target of its cross-entropy, which is not a distribution.
    * OOD images are made in [0, 1] (our models' input range; the reference clamps to [-1, 1] in its
      normalised space); the generator's width is a setting (``ood_ngf``, 64 in DFME).
    * The learnable ``W`` normalises per sample and channel (instance normalisation) in training and when
      served trained; the random served net has none, as released.
    * ``--scale`` sets only the watermark scale (the reference's harness reused it as the attacker's LR decay
      factor, so its attacker's learning rate never decayed); the checkpoint is the best epoch on the
      validation split; every random draw comes from seeded generators; any batch size is served.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from misleader.defenses.base import DefenseSpec, register_defense
from misleader.defenses.perturbation import WatermarkNet, perturb
from misleader.training.resume import RESUME_FILE
from misleader.defenses.retrain import (
    RetrainTask,
    finish_result,
    fit,
    load_victim_data,
    params_checker,
    model_stats,
    RecipeSettings,
    resolve_preset,
    save_tensors,
    served_logits,
    settings_dict,
)
from misleader.errors import MisleaderError

log = logging.getLogger(__name__)

PAPER_URL = "https://proceedings.mlr.press/v235/wang24cb.html"
SERVE_MODES = ("random", "trained")


@dataclass(frozen=True)
class ACTSettings(RecipeSettings):
    """ACT fine-tuning and serving settings (see :data:`PRESETS`; the optimiser's in :class:`RecipeSettings`)."""

    scale: float = 1.0
    hidden: int = 2
    eps: tuple[float, float] | None = (0.3, 0.6)
    alpha: float = 1e-5
    ood_ngf: int = 32
    ood_nz: int = 256
    ood_noise: float = 1.0
    serve: str = "random"  # random | trained
    serve_weight_noise: float = 1.0


#: ``mnist-cpu``: 2 epochs (the reference: 11) with a generator of width 16 (its forward pass was ~60% of an OOD
#: step's CPU time at width 32; the images are from an untrained, noise-perturbed net at any width);
#: ``cifar10-paper``: the reference's 11 epochs
#: of SGD lr 0.001, momentum 0.9, weight decay 5e-4, batch 64, alpha 1e-5, scale 1.0, crop + flip.
_REFERENCE_SGD: dict[str, Any] = {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4,
                                  "schedule": "constant"}
PRESETS: dict[str, ACTSettings] = {
    "mnist-cpu": ACTSettings(epochs=2, ood_ngf=16, **_REFERENCE_SGD),
    "cifar10-paper": ACTSettings(epochs=11, augment="crop_flip", ood_ngf=64, **_REFERENCE_SGD),
}


class _ACTTask(RetrainTask):
    def __init__(self, *, s: ACTSettings, mean: torch.Tensor, std: torch.Tensor, shape: tuple[int, ...],
                 **kwargs: Any) -> None:
        from misleader.models import GeneratorA
        from misleader.utils import forked_rng

        super().__init__(**kwargs)
        self.s, self.mean, self.std = s, mean, std
        with forked_rng(self.g, self.device):
            self.gen = GeneratorA(nz=s.ood_nz, ngf=s.ood_ngf, img_size=shape[1], nc=shape[0]).to(self.device).train()

    def _eps(self, n: int) -> torch.Tensor | None:
        if self.s.eps is None:
            return None
        lo, hi = self.s.eps
        return (lo + (hi - lo) * torch.rand(n, generator=self.g)).to(self.device)

    def watermarked(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x + scale * std * W((x - mean) / std))``: (N, C, H, W) -> (N, K) logits."""
        w = self.modules["watermark"]
        return self.modules["model"](perturb(x, w.pairs(), eps=self._eps(len(x)), scale=self.s.scale, mean=self.mean,
                                             std=self.std, norm="instance"))

    def _ood(self, n: int) -> torch.Tensor:
        from misleader.models import tanh_to_unit

        with torch.no_grad():
            x = tanh_to_unit(self.gen(torch.randn(n, self.s.ood_nz, generator=self.g).to(self.device)).clamp(-1, 1))
            for p in self.gen.parameters():
                p.add_(torch.randn(p.shape, generator=self.g).to(self.device) * self.s.ood_noise)
        return x

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = F.cross_entropy(self.watermarked(x), y)
        if self.steps % 2 == 1:
            return loss, {"ood_change": 0.0}
        xo = self._ood(len(x))
        with torch.no_grad():
            target = torch.softmax(self.modules["model"](xo), 1)
        change = -(target * torch.log_softmax(self.watermarked(xo), 1)).sum(1).mean()
        # logged as a mean over the even (OOD) steps: RetrainTask averages the fields over all steps
        return loss - self.s.alpha * change, {"ood_change": 2 * float(change.detach())}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ood_generator": {k: v.detach().cpu().clone() for k, v in self.gen.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.gen.load_state_dict(state["ood_generator"])


def defend_act(*, victim: str | Path, base: str | Path | None = None, out: str | Path,
               data_dir: str | Path | None = None, seed: int = 0, device: str = "auto", force: bool = False,
               preset: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Fine-tune the victim with ACT and write the folder ``out`` (watermark input step + fine-tuned model).

    Returns:
        ``result.json`` (whole pipeline vs the victim) plus ``train_seconds``, ``history``, ``best_epoch``,
        ``val_accuracy`` and ``mean_l1_between_answers``.
    """
    from misleader.defenses.folder import claim_defense_out, write_defense_folder
    from misleader.models import create_model
    from misleader.training.victim import load_target_data
    from misleader.utils import make_generator, resolve_device

    if base is not None and Path(base).resolve() != Path(victim).resolve():
        raise MisleaderError("defend act fine-tunes the victim: it cannot wrap --base; build other defenses with "
                             "--base on the ACT folder instead")
    out, dev = Path(out), resolve_device(device)
    vd = load_victim_data(victim, data_dir=data_dir, device=dev)
    shape = tuple(int(v) for v in vd.meta["input_shape"])
    name, s = resolve_preset(PRESETS, preset=preset, in_channels=shape[0], overrides=overrides, what="act")
    if s.serve not in SERVE_MODES:
        raise MisleaderError(f"act: serve must be one of {', '.join(SERVE_MODES)}, got {s.serve!r}")
    params = {"preset": name, **settings_dict(s)}
    done = claim_defense_out(out=out, victim=victim, base=None, defense="act", params=params, seed=seed, force=force)
    if done is not None and "train_seconds" in done:
        return done
    g = make_generator(seed)
    model = create_model(vd.meta["arch"], in_channels=shape[0], num_classes=int(vd.meta["num_classes"]),
                         mean=vd.meta.get("mean"), std=vd.meta.get("std")).to(dev)
    model.load_state_dict(vd.model.state_dict())
    wnet = WatermarkNet(in_channels=shape[0], hidden=s.hidden, generator=g).to(dev)
    mean, std = model_stats(vd.meta, dev)
    common = {"scale": s.scale, "eps": None if s.eps is None else list(s.eps), "mean": vd.meta.get("mean"),
              "std": vd.meta.get("std")}
    random_step = {"kind": "input", "type": "random_perturbation", **common, "hidden": s.hidden,
                   "weight_noise": s.serve_weight_noise, "norm": "none"}
    task = _ACTTask(s=s, mean=mean, std=std, shape=shape, modules={"model": model, "watermark": wnet}, data=vd,
                    recipe=s.recipe(), epochs=s.epochs, device=dev, generator=g,
                    served=served_logits(model, random_step, generator=make_generator(seed + 1), mean=mean, std=std))
    res = fit(task, epochs=s.epochs, steps_per_epoch=len(task.loader), resume_path=out / RESUME_FILE,
              settings={"params": params, "seed": seed}, desc="act")
    model.load_state_dict(res.best["model"])
    wnet.load_state_dict(res.best["watermark"])
    if s.serve == "trained":
        step = {"kind": "input", "type": "trained_watermark", **save_tensors(wnet, out=out, rel="act/watermark.safetensors"),
                "hidden": s.hidden, **common, "norm": "instance"}
    else:
        save_tensors(wnet, out=out, rel="act/watermark.safetensors")  # kept for inspection; not served
        step = random_step
    result = write_defense_folder(out=out, victim=victim, base=None, defense="act", steps=[], models={"act": model},
                                  backend={"kind": "backend", "type": "model", "model": "act"}, inputs=[step],
                                  params=params, seed=seed, data_dir=data_dir, device=dev, force=force)
    data, _ = load_target_data(vd.meta, data_dir=data_dir)
    extra = {"train_seconds": res.seconds, "history": res.history, "best_epoch": res.best_epoch,
             "val_accuracy": res.best_val_accuracy}
    result = finish_result(out, result, extra=extra, x_test=data.x_test, device=dev, stochastic=s.eps is not None
                           or s.serve == "random")
    (out / RESUME_FILE).unlink(missing_ok=True)
    return result


defend_act.check_params = params_checker(PRESETS, what="act")  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- CLI and registry

def add_arguments(m: argparse.ArgumentParser) -> None:
    from misleader.defenses.meco import add_retrain_arguments

    add_retrain_arguments(m, PRESETS)
    m.add_argument("--serve", choices=SERVE_MODES, default=None,
                   help="random: a freshly sampled random watermark net per batch (released behaviour, default); "
                        "trained: the fine-tuned watermark net")
    m.add_argument("--alpha", type=float, default=None, help="weight of the OOD output-change term (default 1e-5)")


def params_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from misleader.defenses.meco import retrain_params

    return {**retrain_params(args), "serve": args.serve, "alpha": args.alpha}


ACT = register_defense(DefenseSpec(
    name="act", build=defend_act, add_arguments=add_arguments, params_from_args=params_from_args, paper=PAPER_URL,
    stochastic=True, help="ACT: victim fine-tuned with a learnable watermark net; served behind a random one per batch",
    description="ACT, Bayesian active watermarking (ICML 2024): fine-tunes the victim with a learnable watermark "
                "network on watermarked training data and on watermarked synthetic OOD images of an untrained, "
                "noise-perturbed DFME generator; serves x + scale * W(x) with a freshly sampled random watermark "
                "network per query batch (--serve trained: the fine-tuned one).\n\n"
                "example: misleader defend act --victim runs/v_mnist --out runs/d_act",
    test_params={"epochs": 1, "batch_size": 128, "ood_ngf": 8, "ood_nz": 16}))

__all__ = ["ACT", "ACTSettings", "PRESETS", "defend_act"]
