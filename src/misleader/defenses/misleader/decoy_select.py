"""Choosing a decoy ensemble on extraction resistance, honestly (issue 11, item 2).

The defender scores each candidate folder (e.g. one per ``mu`` or bank) on two numbers it may compute
without the test set and without the evaluation attacks' runs:

* validation utility: the served answers' top-1 accuracy on the victim's validation split;
* a *held-out clone*: the defender runs its own data-free extraction (DFME at its defaults for the target,
  a seed range of its own, :data:`DEFENDER_SEED`) against the candidate with ``queries`` synthetic queries,
  and measures that clone's accuracy on the validation split.

Rule (:func:`select_candidate`): among the candidates whose validation utility is at least the
victim's minus ``tolerance``, the one with the lowest held-out clone accuracy *after the best relabelling of
the clone's classes* (computed with the validation labels: the most a relabelling attacker, who undoes a
secret class permutation with a few real images, can get from that clone; ties: higher utility);
if none qualifies, the one with the highest utility. Members' checkpoints are already chosen on
validation accuracy by :func:`~misleader.defenses.misleader.train_member`.

Method: ``shared/research/misleader-audit.md`` ("Select lambda, mu and checkpoints on extraction
resistance"); DFME: Truong et al., CVPR 2021, https://arxiv.org/abs/2011.14779.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from misleader.errors import MisleaderError
from misleader.metrics import relabelled_accuracy

log = logging.getLogger(__name__)

#: the defender's own DFME seeds start here (evaluation attacks in this project use small seeds)
DEFENDER_SEED = 10_000


@torch.no_grad()
def _val_accuracy(predict, x: torch.Tensor, y: torch.Tensor) -> float:  # noqa: ANN001
    xf = x.float() / 255.0
    dev = next(predict.parameters()).device if isinstance(predict, torch.nn.Module) else torch.device("cpu")
    hits = sum(int((predict(b.to(dev)).argmax(1).cpu() == t).sum()) for b, t in zip(xf.split(1000), y.split(1000)))
    return hits / len(y)


def score_candidate(target: str | Path, *, victim: str | Path, data_dir: str | Path | None = None,
                    queries: int = 50_000, clone_arch: str = "lenet5", seed: int = 0,
                    dfme_options: dict[str, Any] | None = None, device: str = "cpu") -> dict[str, Any]:
    """Validation utility and held-out-clone validation accuracy of the folder ``target``.

    Returns ``{"target", "val_accuracy", "heldout_clone_val_accuracy", "queries", "seed"}``; the DFME seed is
    ``DEFENDER_SEED + seed``.
    """
    from misleader import load_oracle
    from misleader.attacks.dfme import DFME
    from misleader.models import create_model
    from misleader.training.checkpoint import load_model
    from misleader.training.victim import load_target_data
    from misleader.utils import make_generator

    _, vmeta = load_model(Path(victim), device="cpu")
    data, splits = load_target_data(vmeta, data_dir=data_dir)
    x_val, y_val = data.x_train[splits.val], data.y_train[splits.val]
    served = load_oracle(target)
    val_acc = _val_accuracy(served.query, x_val, y_val)
    gen = make_generator(DEFENDER_SEED + int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEFENDER_SEED + int(seed))
        clone = create_model(clone_arch, in_channels=int(vmeta["input_shape"][0]),
                             num_classes=int(vmeta["num_classes"]))
    attack = DFME(**{"preset": "auto", **(dfme_options or {})})
    # as the harness does: the target's public description (the dataset's pixel map, the preset for its scale);
    # without it the defender's clone generated in (x + 1) / 2, a weaker attack than the evaluation's
    attack.adapt_to_target({k: vmeta[k] for k in ("dataset", "input_shape", "num_classes") if k in vmeta})
    res = attack.run(load_oracle(target, budget=queries), budget=queries, clone=clone, generator=gen,
                     device=device)
    res.clone.eval()
    clone_acc = _val_accuracy(res.clone, x_val, y_val)
    dev = next(res.clone.parameters()).device
    with torch.no_grad():
        pred = torch.cat([res.clone(b.to(dev)).argmax(1).cpu() for b in (x_val.float() / 255.0).split(1000)])
    relabelled = relabelled_accuracy(pred, y_val, num_classes=int(vmeta["num_classes"]))
    return {"target": str(target), "val_accuracy": val_acc, "heldout_clone_val_accuracy": clone_acc,
            "heldout_clone_val_accuracy_relabelled": relabelled, "queries": int(res.queries_used),
            "seed": DEFENDER_SEED + int(seed)}


def select_candidate(scores: Sequence[dict[str, Any]], *, victim_val_accuracy: float,
                     tolerance: float = 0.003) -> dict[str, Any]:
    """The rule of the module docstring over :func:`score_candidate` results; returns the chosen score."""
    if not scores:
        raise MisleaderError("no candidates to select from: pass at least one defense folder")
    ok = [s for s in scores if s["val_accuracy"] >= victim_val_accuracy - tolerance]
    if not ok:
        log.warning("no candidate within %.2f points of the victim's validation accuracy: taking the most useful",
                    100 * tolerance)
        return max(scores, key=lambda s: s["val_accuracy"])
    return min(ok, key=lambda s: (_resistance(s), -s["val_accuracy"]))


def _resistance(score: dict[str, Any]) -> float:
    """The held-out clone's accuracy the rule minimises: after the best relabelling of its classes when the score
    has it (a decoy that answers a class permutation is undone by an attacker with a few real images:
    :mod:`misleader.attacks.dfme_relabel`), else as it is (scores written before that number existed)."""
    return score.get("heldout_clone_val_accuracy_relabelled", score["heldout_clone_val_accuracy"])


def select(candidates: Sequence[str | Path], *, victim: str | Path, data_dir: str | Path | None = None,
           tolerance: float = 0.003, **score_kw: Any) -> dict[str, Any]:
    """Score every candidate folder and choose one; returns ``{"chosen", "scores", "victim_val_accuracy", ...}``."""
    from misleader.training.checkpoint import load_model
    from misleader.training.victim import load_target_data

    model, vmeta = load_model(Path(victim), device="cpu")
    data, splits = load_target_data(vmeta, data_dir=data_dir)
    model.eval()
    v_acc = _val_accuracy(lambda b: model(b), data.x_train[splits.val], data.y_train[splits.val])
    scores = [score_candidate(c, victim=victim, data_dir=data_dir, **score_kw) for c in candidates]
    chosen = select_candidate(scores, victim_val_accuracy=v_acc, tolerance=tolerance)
    return {"chosen": chosen["target"], "scores": scores, "victim_val_accuracy": v_acc, "tolerance": tolerance,
            "rule": "lowest held-out clone validation accuracy after the best relabelling among candidates with "
                    "validation utility >= victim - tolerance"}


__all__ = ["DEFENDER_SEED", "score_candidate", "select", "select_candidate"]
