"""misleader attack: run an extraction attack against a victim or defense folder."""

from __future__ import annotations

import argparse
import json
import logging

from misleader.commands.common import add_common, positive_int

log = logging.getLogger(__name__)


def _attack_names() -> list[str]:
    import misleader.attacks  # noqa: F401  (registers every attack)
    from misleader.attacks.base import ATTACKS

    return ATTACKS.names()


def parse_option(s: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value), the value read as YAML (numbers, true/false, null, lists)."""
    import yaml

    key, sep, value = s.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    try:
        return key.strip().replace("-", "_"), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip().replace("-", "_"), value


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "attack", help="run an extraction attack (writes clone.safetensors, history.json, result.json)",
        description="Extract a victim or defense folder through a counting oracle and report the clone's test "
                    "accuracy (final and best-over-evaluations) and fidelity. Attack options are the attack's "
                    "constructor arguments, e.g. -o strategy=adaptive -o epochs=20 for knockoff.")
    p.add_argument("attack", choices=_attack_names(), help="attack name (from the attack registry)")
    p.add_argument("--target", required=True,
                   help="victim folder (train-victim), defense folder (defend) or a server http://HOST:PORT")
    p.add_argument("--api-key", default=None, help="with a server target: the attacker's API key")
    p.add_argument("--referee-key", default=None,
                   help="with a server target: a second key the harness measures the target's test answers with")
    p.add_argument("--pow", default=None, metavar="DIR",
                   help="proof-of-work calibration folder (misleader pow calibrate): meter every query and add a "
                        "`pow` block (puzzle seconds, overhead ratio) to result.json")
    p.add_argument("--budget", type=positive_int, required=True, help="query budget (rows answered by the oracle)")
    p.add_argument("--clone-arch", required=True, help="clone architecture, e.g. lenet5 (see `misleader models`)")
    p.add_argument("--out", required=True, help="output folder (checked writable before the attack runs)")
    p.add_argument("--force", action="store_true",
                   help="start over when --out holds an attack run with other settings")
    p.add_argument("--pool", default=None,
                   help="attacker data for knockoff / dfms-hl: attacker (the target's in-distribution attacker split, "
                        "knockoff's default), a dataset name (e.g. fashion-mnist), cifar10-subset, or npz:PATH")
    p.add_argument("--labels", choices=["soft", "hard"], default=None,
                   help="soft: the API answers probabilities; hard: top-1 labels only (default: soft where the "
                        "attack can use probabilities, else hard, e.g. dfms-hl)")
    p.add_argument("-o", "--option", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="attack option (repeatable), e.g. -o strategy=adaptive -o reward=all -o epochs=20")
    p.add_argument("--eval-every", type=positive_int, default=None,
                   help="evaluate the clone every N queries for the history (attacks that train while querying)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from misleader.attacks.harness import run_attack

    result = run_attack(args.attack, target=args.target, budget=args.budget, clone_arch=args.clone_arch,
                        out=args.out, data_dir=args.data_dir, seed=args.seed, device=args.device,
                        labels=args.labels, pool=args.pool, options=dict(args.option) or None,
                        eval_every=args.eval_every, force=args.force,
                        api_key=args.api_key, referee_key=args.referee_key, pow=args.pow)
    keys = ("attack", "labels", "pool", "target_kind", "clone_accuracy", "clone_accuracy_best", "fidelity",
            "queries_used", "budget", "target_test_accuracy", "victim_test_accuracy", "seconds", "pow_seconds",
            "pow_bits", "pow")
    summary = {k: result[k] for k in keys if k in result}
    if "pow" in summary:  # the per-step trace stays in result.json
        summary["pow"] = {k: v for k, v in summary["pow"].items() if k != "trace"}
    print(json.dumps(summary, indent=2))
    return 0
