"""Choose DFME's ``small`` preset on the attacker's own paid queries, never on test accuracy.

Runs each candidate configuration against ``--target`` with the same budget and seed, keeps each run's
last paid clone batches (generated images with the victim's top-1 answers; ``DFME._last_queries``) and
scores every candidate's clone by its top-1 agreement with the victim on the *other* candidates' batches
(queries it never trained on, from generators other than its own, so that a weak generator that makes
easy images does not win by grading itself). The test set is never read. Prints one JSON line per
candidate and the winner; ``--out`` writes them.

    python bench/select_dfme_preset.py --target runs/v_mnist --budget 200000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

#: candidates: overrides of the ``small`` preset
CANDIDATES: dict[str, dict] = {
    "ngf8-lr5e-4": {"ngf": 8},
    "ngf16-lr5e-4": {"ngf": 16},
    "ngf32-lr5e-4": {"ngf": 32},
    "ngf8-lr1e-4": {"ngf": 8, "lr_generator": 1e-4},
    "ngf8-lr5e-4-paper-milestones": {"ngf": 8, "milestones": [0.1, 0.3, 0.5]},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--budget", type=int, default=200_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated candidate names")
    p.add_argument("--clone-arch", default="lenet5")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from misleader.attacks.dfme import DFME
    from misleader.models import create_model
    from misleader.oracle import describe_target, load_oracle

    meta = describe_target(args.target)
    public = {k: meta[k] for k in ("dataset", "input_shape", "num_classes")}
    c, k = int(meta["input_shape"][0]), int(meta["num_classes"])
    names = args.only.split(",") if args.only else list(CANDIDATES)
    runs = {}
    for name in names:
        attack = DFME(preset="small", **CANDIDATES[name])
        attack.adapt_to_target(public)
        oracle = load_oracle(args.target, output="probs", budget=args.budget, device="cpu")
        gen = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed)
        clone = create_model(args.clone_arch, in_channels=c, num_classes=k, mean=[0.5] * c, std=[0.5] * c)
        t0 = time.perf_counter()
        res = attack.run(oracle, budget=args.budget, clone=clone, generator=gen)
        runs[name] = {"clone": res.clone.eval(), "queries": attack._last_queries, "seconds": time.perf_counter() - t0,
                      "own_heldout_agreement": res.extra["heldout_agreement"], "queries_used": res.queries_used}
        print(json.dumps({"candidate": name, "seconds": round(runs[name]["seconds"], 1),
                          "queries_per_s": round(res.queries_used / runs[name]["seconds"], 1),
                          "own_heldout_agreement": round(res.extra["heldout_agreement"], 4)}), flush=True)
    rows = []
    with torch.inference_mode():
        for name, run in runs.items():
            hits = total = 0
            for other, o in runs.items():
                if other == name:
                    continue
                x, y = o["queries"]
                hits += int((run["clone"](x).argmax(1) == y).sum())
                total += len(y)
            rows.append({"candidate": name, "options": CANDIDATES[name], "cross_heldout_agreement": hits / max(total, 1),
                         "own_heldout_agreement": run["own_heldout_agreement"], "seconds": run["seconds"],
                         "queries_used": run["queries_used"]})
    for r in rows:
        print(json.dumps(r), flush=True)
    best = max(rows, key=lambda r: r["cross_heldout_agreement"])
    print(json.dumps({"selected": best["candidate"], "by": "cross_heldout_agreement", "load": os.getloadavg()}))
    if args.out:
        from misleader.utils import write_json

        write_json(args.out, {"target": args.target, "budget": args.budget, "seed": args.seed, "rows": rows,
                              "selected": best["candidate"], "load_average": os.getloadavg()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
