"""Selection of the decoy variant on validation utility + a defender-run held-out DFME clone (issue 11, item 2).

Score one candidate (one process each, so that they run in parallel):
    PYTHONPATH=src python bench/decoy_select.py score --victim runs/v_mnist --target runs/d_decoy \
        --queries 1000000 --out runs/select/d_decoy.json
Combine the scores and apply the rule (misleader.defenses.misleader.decoy_select.select_candidate):
    PYTHONPATH=src python bench/decoy_select.py combine runs/select/*.json --victim runs/v_mnist \
        --out docs/results/decoy/selection.json
"""

from __future__ import annotations

import argparse
import json

import torch

from misleader.defenses.misleader.decoy_select import score_candidate, select_candidate
from misleader.training.checkpoint import load_model
from misleader.training.victim import load_target_data
from misleader.utils import write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["score", "combine"])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--victim", required=True)
    ap.add_argument("--target")
    ap.add_argument("--queries", type=int, default=1_000_000)
    ap.add_argument("--tolerance", type=float, default=0.003)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.mode == "score":
        write_json(a.out, score_candidate(a.target, victim=a.victim, queries=a.queries))
        return
    model, vmeta = load_model(a.victim, device="cpu")
    data, splits = load_target_data(vmeta)
    xv, yv = data.x_train[splits.val].float() / 255.0, data.y_train[splits.val]
    with torch.no_grad():
        v_acc = float((model.eval()(xv).argmax(1) == yv).float().mean())
    scores = [json.loads(open(f).read()) for f in a.files]
    chosen = select_candidate(scores, victim_val_accuracy=v_acc, tolerance=a.tolerance)
    write_json(a.out, {"chosen": chosen["target"], "scores": scores, "victim_val_accuracy": v_acc,
                       "tolerance": a.tolerance,
                       "rule": "lowest held-out clone validation accuracy after the best relabelling among candidates "
                               "with validation utility >= victim - tolerance (test set never used)"})
    print(json.dumps({"chosen": chosen["target"], "victim_val_accuracy": v_acc, "scores": scores}, indent=1))


if __name__ == "__main__":
    main()
