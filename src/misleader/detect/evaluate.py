"""Evaluate an extraction detector on recorded attack query streams (AUROC, AUPR, FPR@TPR, first flag).

A stream is the sequence of inputs an attack sends to its oracle. :class:`RecordingOracle` wraps the
target's oracle (budget and count stay the wrapped oracle's) and keeps a uniform sample of the rows
queried -- every row when the sample is at least the budget -- as float32 together with each row's
1-based position in the stream. :func:`record_stream` runs an attack through it the way
:func:`misleader.attacks.harness.run_attack` does (same pool choice, clone initialisation and seed), without
writing an attack folder: the stream is scored live, nothing is written but the metrics.

Metrics (positives = attack queries, negatives = an equal number of benign test-split queries), as the
SAME reference evaluates (sklearn ROC/PR; FPR at a TPR interpolated on the ROC curve):

* threshold-free: ``auroc``, ``aupr`` (average precision), ``fpr_at_95_tpr``, ``fpr_at_90_tpr``;
* at the detector's calibrated threshold: ``flagged_fraction`` of the attack's queries, the benign
  ``benign_fpr`` on the test split, ``first_flag`` (the stream position of the first flagged query)
  and ``half_flagged`` (the first position n >= ``min_queries`` at which at least half of the queries
  so far are flagged: when a server keeping :class:`~misleader.detect.same.ClientTracker` with a 50% rule
  would act). On a sampled stream, positions are those of the sampled rows.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from misleader.errors import MisleaderError
from misleader.oracle.base import Oracle

log = logging.getLogger(__name__)

#: stream name -> (attack, pool (None: the attack's own choice), labels, options) on MNIST-sized CPU runs.
#: Knockoff trains nothing while it queries (random strategy), so its training epochs do not change the stream.
STREAMS: dict[str, dict[str, Any]] = {
    "knockoff-ood": {"attack": "knockoff", "pool": "fashion-mnist", "labels": "soft", "options": {"epochs": 0}},
    "knockoff-id": {"attack": "knockoff", "pool": "attacker", "labels": "soft", "options": {"epochs": 0}},
    "dfme": {"attack": "dfme", "pool": None, "labels": "soft", "options": {"preset": "cpu"}},
    "dfms-hl": {"attack": "dfms-hl", "pool": None, "labels": "hard",
                "options": {"preset": "cpu", "pretrain_proxy": 4000, "pretrain_fake": 2000, "val_size": 1000,
                            "pretrain_epochs": 5}},
    "jbda": {"attack": "jbda", "pool": "attacker", "labels": "soft", "options": {}},
}


#: weightings of the score's two terms reported next to the detector's own (diagnostic, never used to choose;
#: the detector's alpha is fixed or selected on defender data before any attack is seen)
ALPHA_SWEEP = (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0)


# --------------------------------------------------------------------------- metrics


def roc_metrics(pos: torch.Tensor, neg: torch.Tensor) -> dict[str, float]:
    """Threshold-free detection metrics, positives = attack scores ``pos`` (N,), negatives = benign ``neg`` (M,)."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    s = np.concatenate([pos.double().numpy(), neg.double().numpy()])
    if len(pos) == 0 or len(neg) == 0:
        raise MisleaderError("detection metrics need both attack and benign scores")
    fpr, tpr, _ = roc_curve(y, s)
    return {"auroc": float(roc_auc_score(y, s)), "aupr": float(average_precision_score(y, s)),
            "fpr_at_95_tpr": float(np.interp(0.95, tpr, fpr)), "fpr_at_90_tpr": float(np.interp(0.90, tpr, fpr))}


def flag_metrics(scores: torch.Tensor, positions: torch.Tensor, *, threshold: float,
                 min_queries: int = 100) -> dict[str, Any]:
    """Threshold metrics of one stream: scores (N,) in stream order, positions (N,) 1-based stream positions."""
    flagged = scores > threshold
    first = int(positions[flagged.nonzero()[0, 0]]) if bool(flagged.any()) else None
    frac = flagged.double().cumsum(0) / torch.arange(1, len(flagged) + 1, dtype=torch.float64)
    ok = (frac >= 0.5) & (torch.arange(1, len(flagged) + 1) >= min(min_queries, len(flagged)))
    half = int(positions[ok.nonzero()[0, 0]]) if bool(ok.any()) else None
    return {"flagged_fraction": float(flagged.double().mean()) if len(flagged) else 0.0, "first_flag": first,
            "half_flagged": half, "half_flagged_min_queries": int(min_queries)}


# --------------------------------------------------------------------------- recording


class RecordingOracle(Oracle):
    """Wraps ``inner`` (its budget and count); keeps the rows at the 1-based positions in ``sample`` (sorted).

    Args:
        inner: the oracle the attack would have received.
        sample: positions to keep (``None``: keep every row).
    """

    def __init__(self, inner: Oracle, *, sample: torch.Tensor | None = None) -> None:
        super().__init__(num_classes=inner.num_classes, input_shape=inner.input_shape, output=inner.output,
                         budget=inner.remaining)
        self._inner = inner
        self._sample = None if sample is None else torch.as_tensor(sample, dtype=torch.long).sort().values
        self._seen = 0
        self.rows: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        pos = torch.arange(self._seen + 1, self._seen + n + 1)
        self._seen += n
        keep = torch.ones(n, dtype=torch.bool) if self._sample is None else torch.isin(pos, self._sample)
        if keep.any():
            self.rows.append(x[keep.to(x.device)].detach().float().cpu().clone())
            self.positions.append(pos[keep])
        ans = self._inner.query(x)
        if ans.dtype == torch.int64:  # a labels oracle: the base class takes argmax of what we return
            return torch.nn.functional.one_hot(ans, self.num_classes).float()
        return ans

    def stream(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows (N, C, H, W) float32, positions (N,) int64)`` recorded so far, in stream order."""
        if not self.rows:
            return torch.zeros(0, *self.input_shape), torch.zeros(0, dtype=torch.long)
        return torch.cat(self.rows), torch.cat(self.positions)


def record_stream(name: str, *, target: str | Path, budget: int, data_dir: str | Path | None = None, seed: int = 0,
                  device: str = "cpu", sample: int | None = None, pool: str | None = None,
                  labels: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run stream ``name`` (a key of :data:`STREAMS`) against ``target`` and return its recorded queries.

    Returns:
        ``{"rows", "positions", "queries_used", "attack", "pool", "labels", "options", "seconds"}``.
    """
    from misleader.attacks.harness import LABEL_MODES, make_attack
    from misleader.attacks.pools import load_pool
    from misleader.models import create_model
    from misleader.oracle.load import open_accounted
    from misleader.oracle.manifest import read_target
    from misleader.training.victim import load_target_data
    from misleader.utils import forked_rng, resolve_device, seed_everything

    if name not in STREAMS:
        raise MisleaderError(f"unknown stream {name!r}; choose from: {', '.join(STREAMS)}")
    spec = STREAMS[name]
    opts = {**spec["options"], **(options or {})}
    labels = labels or spec["labels"]
    attack = make_attack(spec["attack"], opts)
    parsed = read_target(target)
    meta = parsed.meta
    dev = resolve_device(device)
    gen = seed_everything(seed)
    pool_spec = None
    if attack.needs_pool:
        pool_spec = pool or spec["pool"] or attack.choose_pool(dict(parsed.public_meta()))
        data_splits = load_target_data(meta, data_dir=data_dir)
        px, py = load_pool(pool_spec, target_meta=meta, data_dir=data_dir, target_data=data_splits)
        attack.prepare(pool_x=px, pool_y=py)
    shape = [int(s) for s in meta["input_shape"]]
    with forked_rng(gen, torch.device("cpu")):
        clone = create_model("lenet5", in_channels=shape[0], num_classes=int(meta["num_classes"]),
                             mean=[0.5] * shape[0], std=[0.5] * shape[0])
    attack.adapt_to_target(dict(parsed.public_meta()))  # as the harness does (e.g. DFME's pixel mapping)
    oracle, acct = open_accounted(target, output=LABEL_MODES[labels], budget=budget, device=dev)
    keep = None
    if sample is not None and sample < budget:
        keep = torch.randperm(budget, generator=torch.Generator().manual_seed(seed + 1))[:sample] + 1
    rec = RecordingOracle(oracle, sample=keep)
    t0 = time.perf_counter()
    res = attack.run(rec.sealed(), budget=budget, clone=clone, generator=gen, device=dev)
    if acct.used != res.queries_used or acct.used > budget:
        raise RuntimeError(f"stream {name}: accounting broke ({acct.used} counted, {res.queries_used} reported)")
    rows, positions = rec.stream()
    log.info("stream %s: %d queries, %d recorded, %.0fs", name, acct.used, len(rows), time.perf_counter() - t0)
    return {"rows": rows, "positions": positions, "queries_used": int(acct.used), "attack": spec["attack"],
            "pool": pool_spec, "labels": labels, "options": attack.config(), "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- the evaluation


def seconds_per_1000(fn, x: torch.Tensor, *, repeats: int = 3) -> float:  # noqa: ANN001
    """Best-of-``repeats`` wall seconds of ``fn(x)`` per 1,000 rows."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(x)
        best = min(best, time.perf_counter() - t0)
    return best * 1000 / len(x)


def evaluate_detector(*, detector: str | Path, target: str | Path, streams: Sequence[str], budget: int = 10_000,
                      budgets: dict[str, int] | None = None, sample: int = 10_000, data_dir: str | Path | None = None,
                      seed: int = 0, device: str = "cpu", out: str | Path | None = None) -> dict[str, Any]:
    """Score each attack stream against an equal number of benign test queries; write ``out/result.json``.

    Args:
        detector: SAME detector folder.
        target: the victim (or defense) folder the attacks query.
        streams: keys of :data:`STREAMS`.
        budget: queries per stream (``budgets`` overrides per stream, e.g. ``{"dfme": 200000}``).
        sample: score a uniform sample of this many queries of longer streams.
    """
    from misleader.data.loader import to_unit
    from misleader.detect.same import load_detector
    from misleader.oracle.manifest import read_target
    from misleader.training.victim import load_target_data
    from misleader.utils import resolve_device, write_json

    dev = resolve_device(device)
    det = load_detector(detector, device=dev)
    if det.threshold is None:
        raise MisleaderError(f"{detector}: the detector has no calibrated threshold: re-create it")
    meta = read_target(target).meta
    data, _ = load_target_data(meta, data_dir=data_dir)
    b1, b2 = (torch.cat(t) for t in zip(*(det.parts(to_unit(xb)) for xb in data.x_test.split(4096))))
    benign_all = (det.alpha * b1 + (1 - det.alpha) * b2).float()
    x_time = to_unit(data.x_test[:1000])
    timing = {"score_s_per_1000": seconds_per_1000(det.score, x_time),
              "victim_s_per_1000": seconds_per_1000(lambda x: det.victim(x.to(dev)), x_time),
              "threads": torch.get_num_threads()}
    rows: dict[str, Any] = {}
    for name in streams:
        b = int((budgets or {}).get(name, budget))
        rec = record_stream(name, target=target, budget=b, data_dir=data_dir, seed=seed, device=str(dev),
                            sample=sample if b > sample else None)
        s1, s2 = det.parts(rec["rows"]) if len(rec["rows"]) else (torch.zeros(0), torch.zeros(0))
        scores = (det.alpha * s1 + (1 - det.alpha) * s2).float()
        g = torch.Generator().manual_seed(seed + 2)
        pick = torch.randperm(len(benign_all), generator=g)[:len(scores)]
        neg = benign_all[pick]
        # diagnostic only (alpha is fixed before any attack is seen): AUROC of other weightings of the two terms
        by_alpha = {str(a): roc_metrics(a * s1 + (1 - a) * s2, a * b1[pick] + (1 - a) * b2[pick])["auroc"]
                    for a in ALPHA_SWEEP} if len(scores) else {}
        row = {"queries_used": rec["queries_used"], "scored": int(len(scores)), "attack": rec["attack"],
               "pool": rec["pool"], "labels": rec["labels"], "options": rec["options"],
               "attack_seconds": rec["seconds"], "attack_mean_score": float(scores.mean()) if len(scores) else None,
               **roc_metrics(scores, neg), **flag_metrics(scores, rec["positions"], threshold=det.threshold),
               "auroc_by_alpha": by_alpha}
        rows[name] = row
        log.info("%s: AUROC %.4f AUPR %.4f FPR@95 %.4f flagged %.3f first %s", name, row["auroc"], row["aupr"],
                 row["fpr_at_95_tpr"], row["flagged_fraction"], row["first_flag"])
        if out is not None:  # partial results survive an interruption
            write_json(Path(out) / "result.json", _summary(det, benign_all, timing, rows, detector, target, seed))
    res = _summary(det, benign_all, timing, rows, detector, target, seed)
    if out is not None:
        write_json(Path(out) / "result.json", res)
    return res


def _summary(det, benign, timing, rows, detector, target, seed) -> dict[str, Any]:  # noqa: ANN001
    return {"detector": str(detector), "target": str(target), "threshold": det.threshold, "alpha": det.alpha,
            "benign_test_fpr": int((benign > det.threshold).sum()) / len(benign), "benign_test_rows": len(benign),
            "benign_mean_score": float(benign.mean()), **timing, "seed": int(seed), "streams": rows,
            "notes": "positives: the attack's queries (a uniform sample when 'scored' < 'queries_used'); negatives: "
                     "as many benign test-split queries; threshold from the validation split"}


__all__ = ["RecordingOracle", "STREAMS", "evaluate_detector", "flag_metrics", "record_stream", "roc_metrics",
           "seconds_per_1000"]
