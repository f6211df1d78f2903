"""Choose Knockoff's ``fast`` preset on the attacker's own held-out transfer slice, never on test accuracy.

Each candidate training setting runs Knockoff (random strategy) against ``--target`` with the same
queries (same seed, same pool, ``--labels``), holding out ``val_fraction`` = 0.1 of the paid transfer
set; the score is the clone's top-1 agreement with the victim's answers on that held-out slice
(``val_agreement`` of the selected epoch and ``final_val_agreement`` of the last), next to the attack's
wall time. The test set is never read. The chosen setting is the fastest whose held-out agreement is
within ``--tolerance`` of the best (one standard error on a 1,000-row slice is about 0.5 points).

    python bench/select_knockoff_preset.py --target runs/v_mnist --budget 10000 --labels hard
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

#: candidate training settings (overrides of the ``sgd20`` preset)
CANDIDATES: dict[str, dict] = {
    "sgd20-b64": {},
    "reference-sgd100-b64": {"epochs": 100, "lr_step": 60},
    "adam15-b64": {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "epochs": 15},
    "adam10-b128": {"optimizer": "adam", "lr": 2e-3, "momentum": 0.9, "epochs": 10, "batch_size": 128},
    "adam6-b128": {"optimizer": "adam", "lr": 2e-3, "momentum": 0.9, "epochs": 6, "batch_size": 128},
    "adam10-b256": {"optimizer": "adam", "lr": 3e-3, "momentum": 0.9, "epochs": 10, "batch_size": 256},
    "sgd10-b128-m0.9": {"lr": 0.05, "momentum": 0.9, "epochs": 10, "batch_size": 128},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--budget", type=int, default=10_000)
    p.add_argument("--labels", choices=["soft", "hard"], default="hard")
    p.add_argument("--pool", default="attacker")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.005)
    p.add_argument("--only", default=None, help="comma-separated candidate names")
    p.add_argument("--clone-arch", default="lenet5")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MISLEADER_PROGRESS", "0")
    from misleader.attacks.knockoff import KnockoffNets
    from misleader.attacks.pools import load_pool
    from misleader.models import create_model
    from misleader.oracle import describe_target, load_oracle

    meta = describe_target(args.target)
    public = {k: meta[k] for k in ("dataset", "input_shape", "num_classes")}
    c, k = int(meta["input_shape"][0]), int(meta["num_classes"])
    pool_x, pool_y = load_pool(args.pool, target_meta=meta, data_dir=args.data_dir)  # as the harness
    rows = []
    for name in (args.only.split(",") if args.only else list(CANDIDATES)):
        attack = KnockoffNets(preset="sgd20", val_fraction=0.1, **CANDIDATES[name])
        attack.adapt_to_target(public)
        attack.prepare(pool_x=pool_x, pool_y=pool_y)
        oracle = load_oracle(args.target, output="probs" if args.labels == "soft" else "labels",
                             budget=args.budget, device="cpu")
        torch.manual_seed(args.seed)
        clone = create_model(args.clone_arch, in_channels=c, num_classes=k, mean=[0.5] * c, std=[0.5] * c)
        t0 = time.perf_counter()
        res = attack.run(oracle, budget=args.budget, clone=clone, generator=torch.Generator().manual_seed(args.seed))
        row = {"candidate": name, "options": CANDIDATES[name], "seconds": round(time.perf_counter() - t0, 2),
               "val_agreement": res.extra.get("val_agreement"), "selected_epoch": res.extra.get("selected_epoch"),
               "final_val_agreement": res.extra.get("final_val_agreement"), "load": os.getloadavg()[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    best = max(r["val_agreement"] for r in rows)
    ok = [r for r in rows if r["val_agreement"] >= best - args.tolerance]
    chosen = min(ok, key=lambda r: r["seconds"])
    print(json.dumps({"selected": chosen["candidate"], "best_val_agreement": best, "tolerance": args.tolerance}))
    if args.out:
        from misleader.utils import write_json

        write_json(args.out, {"target": args.target, "budget": args.budget, "labels": args.labels, "pool": args.pool,
                              "seed": args.seed, "rows": rows, "selected": chosen["candidate"],
                              "tolerance": args.tolerance})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
