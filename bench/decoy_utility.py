"""Honest users' cost of the decoy variant (issue 11): clean test accuracy and the corruption suite.

Usage: PYTHONPATH=src python bench/decoy_utility.py --victim runs/v_mnist --targets runs/v_mnist runs/d_misleader \
    runs/d_decoy --out docs/results/decoy/utility.json
"""

from __future__ import annotations

import argparse

import torch

from misleader import load_oracle
from misleader.data.corruptions import corruption_accuracy
from misleader.training.checkpoint import load_model
from misleader.training.victim import load_target_data
from misleader.utils import write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--victim", required=True)
    ap.add_argument("--targets", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    _, vmeta = load_model(a.victim, device="cpu")
    data, _ = load_target_data(vmeta)
    res = {}
    for t in a.targets:
        oracle = load_oracle(t)
        res[t] = corruption_accuracy(oracle.query, data.x_test, data.y_test, seed=a.seed)
        print(t, {k: round(100 * v, 2) for k, v in res[t].items()}, flush=True)
    write_json(a.out, {"targets": res, "seed": a.seed, "n_test": len(data.y_test),
                       "notes": "top-1 accuracy of the served answers on the MNIST test set, clean and corrupted "
                                "(misleader.data.corruptions, same corrupted images for every target)"})


if __name__ == "__main__":
    main()
