"""misleader pow: calibrated proof-of-work (train a leakage meter, calibrate, solve, meter streams)."""

from __future__ import annotations

import argparse
import json
import logging

from misleader.commands.common import add_common, positive_int

log = logging.getLogger(__name__)


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("pow", help="calibrated proof-of-work: meters, calibration, puzzles, metered streams",
                       description="Calibrated proof-of-work (Dziedzic et al., ICLR 2022): price each query by the "
                                   "information it reveals.")
    ps = p.add_subparsers(dest="pow_command", metavar="SUBCOMMAND", required=True)

    t = ps.add_parser("train-meter", help="build a leakage meter folder for a victim (safetensors + JSON)")
    t.add_argument("--victim", required=True, help="victim folder (train-victim)")
    t.add_argument("--meter", required=True, choices=["pate", "knn", "entropy", "gap"])
    t.add_argument("--out", required=True, help="meter folder to write")
    t.add_argument("--teachers", type=positive_int, default=50, help="pate: teachers on disjoint parts (default 50)")
    t.add_argument("--teacher-arch", default="lenet5_half", help="pate: teacher architecture (default lenet5_half)")
    t.add_argument("--teacher-epochs", type=positive_int, default=20, help="pate: epochs per teacher (default 20)")
    t.add_argument("--sigma", type=float, default=None, help="GNMax noise (default: pate 2, knn 28)")
    t.add_argument("--delta", type=float, default=1e-5, help="delta of the (epsilon, delta) conversion")
    t.add_argument("--k", type=positive_int, default=300, help="knn: neighbours (default 300)")
    t.add_argument("--force", action="store_true", help="rebuild an existing meter folder")
    add_common(t)
    t.set_defaults(func=run_train_meter)

    c = ps.add_parser("calibrate", help="honest stream on the validation split -> PoW constants (config.json)")
    c.add_argument("--meter", required=True, help="meter folder (pow train-meter)")
    c.add_argument("--out", required=True, help="calibration folder to write")
    c.add_argument("--batch-size", type=positive_int, default=64)
    c.add_argument("--queries", type=positive_int, default=None, help="honest queries (default: the whole split)")
    c.add_argument("--step-queries", type=positive_int, default=64, help="one puzzle per this many queries")
    c.add_argument("--honest-overhead", type=float, default=0.5,
                   help="honest delay per step as a fraction of the measured raw seconds per step (default 0.5)")
    c.add_argument("--honest-seconds", type=float, default=None, help="honest delay per step in seconds (overrides)")
    c.add_argument("--base", type=float, default=None, help="delay multiplier per unit of deviation (default derived)")
    c.add_argument("--hash-seconds", type=float, default=2.0, help="seconds to measure the hash rate")
    c.add_argument("--max-bits", type=int, default=None, help="difficulty cap (at most the hard MAX_BITS)")
    c.add_argument("--force", action="store_true", help="redo an existing calibration")
    add_common(c)
    c.set_defaults(func=run_calibrate)

    s = ps.add_parser("solve", help="solve a challenge token with the reference solver; prints the nonce")
    s.add_argument("token", help="the challenge token as issued")
    s.set_defaults(func=run_solve)

    h = ps.add_parser("honest", help="meter an honest stream (test split, batches) and write its pow block")
    h.add_argument("--pow", required=True, dest="pow_dir", help="calibration folder (pow calibrate)")
    h.add_argument("--out", required=True, help="output folder (result.json)")
    h.add_argument("--target", default=None, help="victim or defense folder to query (default: the meter's victim)")
    h.add_argument("--batch-size", type=positive_int, default=64)
    h.add_argument("--queries", type=positive_int, default=None, help="queries (default: the whole test split)")
    add_common(h)
    h.set_defaults(func=run_honest)

    a = ps.add_parser("stream", help="meter an attacker stream: random, cheapest-first or honest-mixed")
    a.add_argument("--pow", required=True, dest="pow_dir", help="calibration folder (pow calibrate)")
    a.add_argument("--out", required=True, help="output folder (result.json)")
    a.add_argument("--order", required=True, choices=["random", "cheapest", "mixed"])
    a.add_argument("--queries", type=positive_int, required=True)
    a.add_argument("--pool", default=None, help="pool dataset (default: the target dataset's attacker split)")
    a.add_argument("--target", default=None, help="victim or defense folder to query (default: the meter's victim)")
    a.add_argument("--batch-size", type=positive_int, default=64)
    a.add_argument("--clone-arch", default="lenet5")
    a.add_argument("--clone-epochs", type=int, default=0, help="train a clone on the answers for this many epochs")
    add_common(a)
    a.set_defaults(func=run_stream)


def _print(result: dict) -> None:
    pow_block = result.get("pow", {})
    keep = {k: pow_block[k] for k in ("queries", "cumulative_cost", "puzzle_seconds", "raw_seconds", "overhead_ratio")
            if k in pow_block}
    keep.update({k: result[k] for k in ("clone_accuracy", "filler_queries") if k in result})
    print(json.dumps(keep, indent=2))


def run_train_meter(args: argparse.Namespace) -> int:
    from misleader.pow.meters import train_meter

    config = train_meter(victim=args.victim, meter=args.meter, out=args.out, data_dir=args.data_dir, seed=args.seed,
                         device=args.device, teachers=args.teachers, teacher_arch=args.teacher_arch,
                         teacher_epochs=args.teacher_epochs, sigma=args.sigma, delta=args.delta, k=args.k,
                         force=args.force)
    print(json.dumps({"meter": config["meter"], "params": config["params"], "info": config["info"]}, indent=2))
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from misleader.pow.calibration import calibrate
    from misleader.pow.puzzle import MAX_BITS

    config = calibrate(meter=args.meter, out=args.out, data_dir=args.data_dir, seed=args.seed, device=args.device,
                       batch_size=args.batch_size, queries=args.queries, step_queries=args.step_queries,
                       honest_overhead=args.honest_overhead, honest_seconds=args.honest_seconds, base=args.base,
                       hash_seconds=args.hash_seconds,
                       max_bits=MAX_BITS if args.max_bits is None else args.max_bits, force=args.force)
    print(json.dumps({k: config[k] for k in ("cost_per_query", "base", "honest_seconds", "hash_rate")}, indent=2))
    return 0


def run_solve(args: argparse.Namespace) -> int:
    from misleader.pow.puzzle import solve

    print(solve(args.token))
    return 0


def run_honest(args: argparse.Namespace) -> int:
    from misleader.pow.metering import honest

    _print(honest(pow_dir=args.pow_dir, out=args.out, target=args.target, data_dir=args.data_dir, seed=args.seed,
                  device=args.device, batch_size=args.batch_size, queries=args.queries))
    return 0


def run_stream(args: argparse.Namespace) -> int:
    from misleader.pow.adaptive import stream

    _print(stream(pow_dir=args.pow_dir, out=args.out, order=args.order, queries=args.queries, pool=args.pool,
                  target=args.target, data_dir=args.data_dir, seed=args.seed, device=args.device,
                  batch_size=args.batch_size, clone_arch=args.clone_arch, clone_epochs=args.clone_epochs))
    return 0
