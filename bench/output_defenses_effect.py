"""Utility and Knockoff clone accuracy of each output defense on an MNIST victim, before the pipeline exists.

Each defense is the victim's softmax followed by its step (built here with the builders' own helpers:
MAD's random surrogate copy, GRAD²'s surrogate distilled on Fashion-MNIST, AM's OE-trained detector and
misinformation model), served by a small :class:`StepOracle`. For each defense and setting it records
test accuracy, fidelity to the victim, mean and max L1 to the victim on the test set, and (unless
``--no-attack``) the clone accuracy of Knockoff Nets (random, soft labels, ``--budget`` queries from the
attacker split) run by the harness (:func:`misleader.attacks.harness.run_attack`) against that oracle.

Once defense folders exist (manifest format 2), the experiment runner replaces this script.

Usage::

    OMP_NUM_THREADS=1 python bench/output_defenses_effect.py --victim runs/v_mnist --data-dir ../shared/data

Writes ``bench/results/output_defenses_effect.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from misleader.oracle.base import Oracle
from misleader.oracle.steps import STEPS, StepContext
from misleader.utils import environment, write_json


class StepOracle(Oracle):
    """The victim's softmax followed by output/gate steps (what a format-2 folder will serve)."""

    def __init__(self, victim: torch.nn.Module, steps: list, **kwargs) -> None:  # noqa: ANN001
        super().__init__(**kwargs)
        self._victim, self._steps = victim.eval(), steps

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self._victim(x.float()).float(), dim=1)
        for s in self._steps:
            if s.kind == "gate":
                a = s.weight(p, x)[:, None]
                p = (1 - a) * p + a * s.branch(x)
            else:
                p = s(p, x)
        return p


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--victim", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--budget", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=20, help="Knockoff training epochs")
    p.add_argument("--only", nargs="*", default=None, help="defense labels to run (default: all)")
    p.add_argument("--no-attack", action="store_true")
    p.add_argument("--dfme", type=int, default=0, help="also run DFME (cpu preset) with this budget (0: no)")
    p.add_argument("--dfme-only", nargs="*", default=None, help="defense labels DFME runs on (default: all run)")
    p.add_argument("--work", default="runs/effect", help="where attack folders go")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import misleader.defenses  # noqa: F401  (registers)
    from misleader.attacks.harness import run_attack
    from misleader.defenses.output_builder import distill_surrogates, random_victim_copy, train_adaptive_misinfo
    from misleader.training.checkpoint import load_model
    from misleader.training.evaluate import predict_probs
    from misleader.training.victim import load_target_data

    victim, meta = load_model(args.victim)
    data, _ = load_target_data(meta, data_dir=args.data_dir)
    t0 = time.perf_counter()
    models = {"mad": random_victim_copy(victim=args.victim, seed=0)}
    if args.only is None or any(o.startswith("grad2") for o in args.only):
        (models["grad2"],), transfer = distill_surrogates(victim=args.victim, base=None, data_dir=args.data_dir,
                                                          seed=0, device="cpu", epochs=[3], transfer="auto",
                                                          limit=20_000)
    if args.only is None or any(o.startswith("am") for o in args.only):
        models["det"], models["mis"], oe = train_adaptive_misinfo(victim=args.victim, data_dir=args.data_dir, seed=0,
                                                                  device="cpu", epochs=2, oe="auto")
    train_seconds = time.perf_counter() - t0
    configs = {
        "undefended": [],
        "randp eps=0.5": [("randp", {"epsilon": 0.5})], "randp eps=1.0": [("randp", {"epsilon": 1.0})],
        "mad eps=0.5": [("mad", {"epsilon": 0.5, "oracle": "extreme", "surrogate": "mad"})],
        "mad eps=1.0": [("mad", {"epsilon": 1.0, "oracle": "extreme", "surrogate": "mad"})],
        "mad-argmax eps=1.0": [("mad", {"epsilon": 1.0, "oracle": "argmax", "surrogate": "mad"})],
        "grad2 eps=0.5": [("grad2", {"epsilon": 0.5, "surrogates": ["grad2"]})],
        "grad2 eps=1.0": [("grad2", {"epsilon": 1.0, "surrogates": ["grad2"]})],
        "am tau=0.5": [("adaptive_misinfo", {"tau": 0.5, "nu": 1000.0, "misinfo": "mis", "detector": "det"})],
        "am tau=0.9": [("adaptive_misinfo", {"tau": 0.9, "nu": 1000.0, "misinfo": "mis", "detector": "det"})],
        "reverse-sigmoid b=0.5 g=0.2": [("reverse_sigmoid", {"beta": 0.5, "gamma": 0.2})],
        "reverse-sigmoid b=1.0 g=0.1": [("reverse_sigmoid", {"beta": 1.0, "gamma": 0.1})],
    }
    p_victim = predict_probs(victim, data.x_test, amp=False)
    rows = {}
    for label, entries in configs.items():
        if args.only is not None and label not in args.only:
            continue
        ctx = StepContext(folder=Path("."), device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                          num_classes=10, input_shape=tuple(meta["input_shape"]), load_model=models.__getitem__)
        steps = [STEPS.get(t).from_manifest(s, ctx=ctx) for t, s in entries]

        def make_oracle(*_a, output: str = "probs", budget: int | None = None, **_k) -> StepOracle:
            return StepOracle(victim, steps, num_classes=10, input_shape=meta["input_shape"], output=output,
                              budget=budget)

        from misleader.training.evaluate import query_all

        p_def = query_all(make_oracle(), data.x_test)
        l1 = (p_def - p_victim).abs().sum(dim=1)
        row = {"test_accuracy": float((p_def.argmax(1) == data.y_test).float().mean()),
               "fidelity": float((p_def.argmax(1) == p_victim.argmax(1)).float().mean()),
               "mean_l1_to_victim": float(l1.mean()), "max_l1_to_victim": float(l1.max())}
        if not args.no_attack:
            with mock.patch("misleader.oracle.load.load_oracle", make_oracle):
                res = run_attack("knockoff", target=args.victim, budget=args.budget, clone_arch="lenet5",
                                 out=Path(args.work) / label.replace(" ", "_"), data_dir=args.data_dir, seed=0,
                                 device="cpu", labels="soft", options={"epochs": args.epochs})
            row["knockoff_clone_accuracy"] = res["clone_accuracy"]
        if args.dfme and (args.dfme_only is None or label in args.dfme_only):
            with mock.patch("misleader.oracle.load.load_oracle", make_oracle):
                res = run_attack("dfme", target=args.victim, budget=args.dfme, clone_arch="lenet5",
                                 out=Path(args.work) / ("dfme_" + label.replace(" ", "_")), data_dir=args.data_dir,
                                 seed=0, device="cpu", labels="soft", options={"preset": "cpu"})
            row["dfme_clone_accuracy"] = res["clone_accuracy"]
        rows[label] = row
        print(label, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)}, flush=True)
    result = {"command": "python " + " ".join(sys.argv), "victim": args.victim, "budget": args.budget, "dfme_budget": args.dfme,
              "knockoff_epochs": args.epochs, "train_seconds": train_seconds, "load_average": os.getloadavg(),
              "rows": rows, "environment": environment()}
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "output_defenses_effect.json"
    write_json(out, result)
    return result


if __name__ == "__main__":
    main()
