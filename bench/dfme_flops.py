"""Arithmetic of one DFME query against one oracle row: the ceiling of ``DFME queries/s / oracle rows/s``.

Counts floating-point operations with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and
matrix products, forward and backward; element-wise work is not counted) for

* the oracle: one forward pass of the target per answered row;
* DFME: a short run of :class:`misleader.attacks.dfme.DFME` with the given options (default: the preset
  the target's scale selects), everything it computes per paid query, *including* the oracle's own rows
  (the oracle is in the same process), over ``--iterations`` iterations.

If DFME's arithmetic ran at the oracle's FLOP rate, its queries/s would be
``oracle_flops_per_row / dfme_flops_per_query`` times the oracle's rows/s: the ceiling the issue's
"ratio to the oracle" can reach without changing the attack's arithmetic. Prints one JSON object.

    python bench/dfme_flops.py --target runs/grid/victims/mnist-lenet5-s0-aedbbacf33
    python bench/dfme_flops.py --target V --options '{"preset": "small-fast"}'
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="victim or defense folder")
    p.add_argument("--clone-arch", default="lenet5")
    p.add_argument("--options", default="{}", help="DFME options as JSON (default: the auto preset)")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from misleader.attacks.dfme import DFME
    from misleader.models import create_model
    from misleader.oracle import describe_target, open_accounted

    meta = describe_target(args.target)
    shape = tuple(meta["input_shape"])
    k = int(meta["num_classes"])
    attack = DFME(**json.loads(args.options))
    attack.adapt_to_target(meta)
    budget = args.iterations * attack.cost_per_iteration

    oracle, _ = open_accounted(args.target, output="probs", budget=None, device="cpu")
    x = torch.rand(512, *shape)
    with FlopCounterMode(display=False) as fc:
        oracle.query(x)
    oracle_per_row = fc.get_total_flops() / len(x)

    oracle, _ = open_accounted(args.target, output="probs", budget=budget, device="cpu")
    clone = create_model(args.clone_arch, in_channels=shape[0], num_classes=k)
    with FlopCounterMode(display=False) as fc:
        res = attack.run(oracle.sealed(), budget=budget, clone=clone, generator=torch.Generator().manual_seed(0))
    per_query = fc.get_total_flops() / res.queries_used
    out = {"target": args.target, "preset": attack.preset, "options": json.loads(args.options),
           "cost_per_iteration": attack.cost_per_iteration, "iterations": args.iterations,
           "oracle_flops_per_row": oracle_per_row, "dfme_flops_per_query": per_query,
           "ceiling_ratio_to_oracle": oracle_per_row / per_query,
           "flops_by_op": {str(op): v / res.queries_used for op, v in fc.get_flop_counts()["Global"].items()},
           "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}
    print(json.dumps(out, indent=1))
    if args.out:
        from misleader.utils import write_json

        write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
