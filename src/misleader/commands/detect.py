"""misleader detect same {train,evaluate}: the SAME extraction-query detector."""

from __future__ import annotations

import argparse
import json
import logging

from misleader.commands.common import add_common, positive_float, positive_int

log = logging.getLogger(__name__)


def _budget_of(s: str) -> tuple[str, int]:
    name, sep, value = s.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected STREAM=N such as dfme=200000, got {s!r}")
    return name.strip(), positive_int(value)


def _alpha(s: str) -> float | str:
    from misleader.detect.same import parse_alpha
    from misleader.errors import MisleaderError

    try:
        return parse_alpha(s)
    except MisleaderError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub) -> None:  # noqa: ANN001
    from misleader.detect.evaluate import STREAMS
    from misleader.detect.same import ALPHA_GRID, DEFAULT_ALPHA, DEFAULT_FPR, PRESETS, SELECT_ROWS

    p = sub.add_parser("detect", help="extraction-query detectors (SAME)",
                       description="Train and evaluate detectors of model-extraction traffic.")
    kinds = p.add_subparsers(dest="detector_kind", metavar="DETECTOR")
    kinds.required = True
    same = kinds.add_parser("same", help="SAME: masked-autoencoder reconstruction + auxiliary classifier "
                                         "(https://arxiv.org/abs/2312.10578)")
    acts = same.add_subparsers(dest="detect_action", metavar="ACTION")
    acts.required = True

    t = acts.add_parser("train", help="train the MAE and auxiliary classifier on the victim's defender split",
                        description="Train SAME's masked autoencoder and auxiliary classifier on the victim's "
                                    "defender split (selection on validation) and calibrate the threshold on the "
                                    "validation split for --fpr. Writes detector.json, mae.safetensors, aux/.")
    t.add_argument("--victim", required=True, help="victim folder (train-victim)")
    t.add_argument("--out", required=True, help="detector folder")
    t.add_argument("--preset", choices=sorted(PRESETS), default="mnist-cpu",
                   help="mnist-cpu (minutes on 2 cores) or paper (the reference's CIFAR-10 setting, GPU)")
    t.add_argument("--alpha", type=_alpha, default="auto",
                   help="weight of the reconstruction term in the score: a number in [0, 1] (the reference's is "
                        f"{DEFAULT_ALPHA}) or auto (default): the alpha of {list(ALPHA_GRID)} with the best mean "
                        "validation AUROC against defender-made outliers (random DFME/DCGAN generator images, strong "
                        "corruptions of validation images); the per-alpha table goes to detector.json")
    t.add_argument("--select-rows", type=positive_int, default=SELECT_ROWS,
                   help=f"with --alpha auto: rows per synthetic outlier set (default {SELECT_ROWS})")
    t.add_argument("--fpr", type=positive_float, default=DEFAULT_FPR, help="target false-positive rate (default 0.05)")
    t.add_argument("--mae-epochs", type=positive_int, default=None, help="override the preset's MAE epochs")
    t.add_argument("--aux-epochs", type=positive_int, default=None, help="override the preset's aux epochs")
    t.add_argument("--loss", choices=["all", "masked"], default=None,
                   help="MAE loss: all (all-pixel MSE / 0.75, the reference) or masked (masked patches only)")
    t.add_argument("--limit", type=positive_int, default=None, help="use only this many training rows (smoke runs)")
    t.add_argument("--force", action="store_true", help="start over when --out holds a run with other settings")
    add_common(t)
    t.set_defaults(func=run_train)

    e = acts.add_parser("evaluate", help="score attack query streams against benign test queries",
                        description="Run each attack stream against --target through a recording oracle, score its "
                                    "queries and as many benign test-split queries: AUROC, AUPR, FPR at 95/90%% TPR, "
                                    "and at the calibrated threshold the flagged fraction, first flag and 50%% flag.")
    e.add_argument("--detector", required=True, help="detector folder (detect same train)")
    e.add_argument("--target", required=True, help="the victim or defense folder the attacks query")
    e.add_argument("--streams", default=",".join(STREAMS), help=f"comma-separated, from: {', '.join(STREAMS)}")
    e.add_argument("--budget", type=positive_int, default=10_000, help="queries per stream (default 10000)")
    e.add_argument("--budget-of", type=_budget_of, action="append", default=[], metavar="STREAM=N",
                   help="per-stream budget, e.g. dfme=200000 (repeatable)")
    e.add_argument("--sample", type=positive_int, default=10_000,
                   help="score a uniform sample of this many queries of longer streams (default 10000)")
    e.add_argument("--out", required=True, help="folder for result.json")
    add_common(e)
    e.set_defaults(func=run_evaluate)


def run_train(args: argparse.Namespace) -> int:
    from misleader.detect.same import train_same

    res = train_same(victim=args.victim, out=args.out, data_dir=args.data_dir, seed=args.seed, device=args.device,
                     preset=args.preset, alpha=args.alpha, target_fpr=args.fpr, mae_epochs=args.mae_epochs,
                     aux_epochs=args.aux_epochs, loss=args.loss, limit=args.limit, select_rows=args.select_rows,
                     force=args.force)
    shown = {k: res[k] for k in ("threshold", "target_fpr", "val_fpr", "alpha", "seconds")}
    if res.get("alpha_selection"):
        table = res["alpha_selection"]["auroc"]
        shown["validation_auroc_by_alpha"] = {a: round(r["mean"], 4) for a, r in table.items()}
    print(json.dumps(shown, indent=2))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from misleader.detect.evaluate import STREAMS, evaluate_detector
    from misleader.errors import MisleaderError

    streams = [s.strip() for s in args.streams.split(",") if s.strip()]
    bad = [s for s in streams + [n for n, _ in args.budget_of] if s not in STREAMS]
    if bad:
        raise MisleaderError(f"unknown stream(s) {', '.join(bad)}: choose from {', '.join(STREAMS)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    res = evaluate_detector(detector=args.detector, target=args.target, streams=streams, budget=args.budget,
                            budgets=dict(args.budget_of), sample=args.sample, data_dir=args.data_dir, seed=args.seed,
                            device=args.device, out=args.out)
    keys = ("auroc", "aupr", "fpr_at_95_tpr", "fpr_at_90_tpr", "flagged_fraction", "first_flag", "half_flagged")
    print(json.dumps({"benign_test_fpr": res["benign_test_fpr"], "score_s_per_1000": res["score_s_per_1000"],
                      "victim_s_per_1000": res["victim_s_per_1000"],
                      "streams": {n: {k: r[k] for k in keys} for n, r in res["streams"].items()}}, indent=2))
    return 0
