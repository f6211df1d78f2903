"""Knockoff Nets: ART's ``KnockoffNets`` against misleader's, same victim, same pool, same process.

Issue 10.5. Both attacks steal ``--target`` with hard labels (top-1 answers), ``--budget`` queries drawn
from the target's attacker split, and a LeNet5 thief; the victim is answered for both by the same
counting oracle (ART through a ``BlackBoxClassifier`` whose ``predict`` queries it). ART's setting is
the one from the issue: ``KnockoffNets(batch_size_fit=64, nb_epochs=15, sampling_strategy="random",
use_probability=False)`` with an Adam (lr 1e-3) ``PyTorchClassifier`` thief. misleader's runs with its
default preset for the target (``preset="auto"``). Prints one JSON line per attack (clone test
accuracy, attack wall seconds and this process's CPU seconds, queries, load average; for misleader the
querying and training seconds) and the ratios of the times; the test set is read only here, to report.
ART shuffles with numpy's global RNG, seeded with ``--seed`` so that a rerun repeats ART's run.

ART is optional (the ``bench`` extra: ``pip install adversarial-robustness-toolbox``); without it the
script says so and exits 0.

    python bench/bench_vs_art.py --target runs/v_mnist --data-dir /work/shared/data --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--budget", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--art-epochs", type=int, default=15)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    try:
        from art.attacks.extraction import KnockoffNets as ArtKnockoff
        from art.estimators.classification import BlackBoxClassifier, PyTorchClassifier
    except ImportError:
        print(json.dumps({"skipped": "ART is not installed (pip install adversarial-robustness-toolbox)"}))
        return 0
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MISLEADER_PROGRESS", "0")
    from misleader.attacks.knockoff import KnockoffNets
    from misleader.attacks.pools import load_pool
    from misleader.data import to_unit
    from misleader.metrics import accuracy
    from misleader.models import create_model
    from misleader.oracle import describe_target, load_oracle
    from misleader.training.evaluate import predict_probs
    from misleader.training.victim import load_target_data

    meta = describe_target(args.target)
    c, k = int(meta["input_shape"][0]), int(meta["num_classes"])
    shape = tuple(int(s) for s in meta["input_shape"])
    data, splits = load_target_data(meta, data_dir=args.data_dir)
    pool_x, pool_y = load_pool("attacker", target_meta=meta, data_dir=args.data_dir, target_data=(data, splits))
    perm = torch.randperm(len(pool_x), generator=torch.Generator().manual_seed(args.seed))[: args.budget]

    def lenet() -> nn.Module:
        torch.manual_seed(args.seed)
        return create_model("lenet5", in_channels=c, num_classes=k, mean=[0.5] * c, std=[0.5] * c)

    def test_accuracy(clone: nn.Module) -> float:
        return accuracy(predict_probs(clone.eval(), data.x_test, device="cpu").argmax(1), data.y_test)

    rows = []
    # ---- ART
    oracle = load_oracle(args.target, output="labels", budget=args.budget, device="cpu")

    def predict(x):  # numpy (N, C, H, W) float32 in [0, 1] -> one-hot numpy (N, K)
        y = oracle.query(torch.from_numpy(x).float())
        return torch.nn.functional.one_hot(y, k).float().numpy()

    victim_art = BlackBoxClassifier(predict, input_shape=shape, nb_classes=k, clip_values=(0.0, 1.0))
    thief_net = lenet()
    thief = PyTorchClassifier(model=thief_net, loss=nn.CrossEntropyLoss(),
                              optimizer=torch.optim.Adam(thief_net.parameters(), lr=1e-3), input_shape=shape,
                              nb_classes=k, clip_values=(0.0, 1.0), device_type="cpu")
    x_np = to_unit(pool_x[perm]).numpy()
    np.random.seed(args.seed)  # ART shuffles its batches with numpy's global RNG
    t0, c0 = time.perf_counter(), time.process_time()
    art = ArtKnockoff(classifier=victim_art, batch_size_fit=64, batch_size_query=256, nb_epochs=args.art_epochs,
                      nb_stolen=args.budget, sampling_strategy="random", use_probability=False, verbose=False)
    stolen = art.extract(x=x_np, thieved_classifier=thief)
    art_s, art_cpu = time.perf_counter() - t0, time.process_time() - c0
    rows.append({"attack": "art-knockoff", "seconds": round(art_s, 2), "cpu_seconds": round(art_cpu, 2),
                 "queries": oracle.queries_used, "load": os.getloadavg()[0],
                 "clone_accuracy": round(test_accuracy(stolen.model), 4), "epochs": args.art_epochs})
    print(json.dumps(rows[-1]), flush=True)
    # ---- misleader
    oracle = load_oracle(args.target, output="labels", budget=args.budget, device="cpu")
    attack = KnockoffNets()
    attack.adapt_to_target({kk: meta[kk] for kk in ("dataset", "input_shape", "num_classes")})
    attack.prepare(pool_x=pool_x[perm], pool_y=pool_y[perm] if pool_y is not None else None)
    t0, c0 = time.perf_counter(), time.process_time()
    res = attack.run(oracle, budget=args.budget, clone=lenet(), generator=torch.Generator().manual_seed(args.seed))
    ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    rows.append({"attack": "misleader-knockoff", "preset": attack.preset, "seconds": round(ours_s, 2),
                 "cpu_seconds": round(ours_cpu, 2), "query_seconds": res.extra["query_seconds"],
                 "train_seconds": res.extra["train_seconds"], "load": os.getloadavg()[0],
                 "queries": oracle.queries_used, "clone_accuracy": round(test_accuracy(res.clone), 4),
                 **{key: getattr(attack, key) for key in ("epochs", "batch_size", "optimizer", "lr", "momentum",
                                                          "schedule", "shift", "label_smoothing", "channels_last")}})
    print(json.dumps(rows[-1]), flush=True)
    summary = {"time_ratio_ours_over_art": round(ours_s / art_s, 3),
               "cpu_time_ratio_ours_over_art": round(ours_cpu / art_cpu, 3),
               "accuracy_diff_ours_minus_art": round(rows[1]["clone_accuracy"] - rows[0]["clone_accuracy"], 4),
               "load_average": os.getloadavg()}
    print(json.dumps(summary))
    if args.out:
        from misleader.utils import environment, write_json

        write_json(args.out, {"target": args.target, "budget": args.budget, "rows": rows, **summary,
                              "command": "python bench/bench_vs_art.py " + " ".join(argv or sys.argv[1:]),
                              "environment": environment()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
