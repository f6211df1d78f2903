"""Does a MISLEADER ensemble mislead? Compare defense folders (e.g. MISLEADER vs. plain KD) to their victim.

For each target folder (a victim or defense folder; ``load_oracle`` opens both), on the test set:

1. utility: test accuracy, top-1 agreement with the victim, mean L1 to the victim's probabilities;
2. divergence from the victim off the clean distribution: KL(victim || target), mean L1 and top-1
   agreement on (a) strongly augmented test images (MISLEADER's simulated attacker distribution,
   :func:`misleader.data.augment.strong_augmentation`) and (b) images from an untrained DFME
   generator (``GeneratorA``, as a DFME attack starts);
3. a small extraction probe with exactly that query distribution: ``--budget`` queries of strongly
   augmented images from the attacker split (disjoint from the defender's data), answered by the
   target's counting oracle (probabilities), and a ``--clone-arch`` clone trained on them with soft
   cross-entropy (Adam 1e-3, batch 128, ``--clone-epochs`` epochs, final epoch kept); reported:
   the clone's test accuracy and its agreement with the victim.

Usage::

    python bench/misleader_effect.py --victim V --targets V,ENS_KD,ENS_MISLEADER --labels victim,kd,misleader \
        --data-dir /work/shared/data

Writes ``bench/results/misleader_effect_<dataset>.json`` (or ``--out``) and prints a Markdown table.
This is an analysis script, not a test: it needs trained folders (see ``misleader defend``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from misleader import load_oracle
from misleader.data.augment import augment, strong_augmentation
from misleader.data.loader import to_unit
from misleader.metrics import accuracy, fidelity, mean_l1
from misleader.models import GeneratorA, create_model, tanh_to_unit
from misleader.training.checkpoint import load_model
from misleader.training.evaluate import predict_probs, query_all
from misleader.training.victim import load_target_data
from misleader.utils import environment, make_generator, write_json


def _kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> float:
    p, q = p.clamp_min(eps), q.clamp_min(eps)
    return float((p * (p.log() - q.log())).sum(1).mean())


def _compare(pv: torch.Tensor, pt: torch.Tensor) -> dict[str, float]:
    return {"kl_victim_to_target": _kl(pv, pt), "mean_l1": mean_l1(pt, pv), "agreement": fidelity(pt, pv)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--victim", required=True)
    p.add_argument("--targets", required=True, help="comma-separated victim/defense folders")
    p.add_argument("--labels", default=None, help="comma-separated names for the targets")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--budget", type=int, default=20000)
    p.add_argument("--clone-arch", default="lenet5")
    p.add_argument("--clone-epochs", type=int, default=10)
    p.add_argument("--generator-samples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    victim, meta = load_model(args.victim)
    data, splits = load_target_data(meta, data_dir=args.data_dir)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else targets
    c, size = int(data.x_test.shape[1]), int(data.x_test.shape[-1])
    strong = strong_augmentation(image_size=size, channels=c)

    g = make_generator(args.seed)
    x_test_aug = torch.cat([augment(strong, to_unit(b), generator=g) for b in data.x_test.split(2048)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        gen = GeneratorA(nz=256, ngf=64, img_size=size, nc=c).train()
        with torch.no_grad():
            z = torch.randn(args.generator_samples, 256, generator=g)
            x_gen = torch.cat([tanh_to_unit(gen(b)) for b in z.split(256)]).clamp(0, 1)
    # the attacker's query set: the same augmented images for every target
    pool = data.x_train[splits.attacker]
    reps = -(-args.budget // len(pool))
    x_q = torch.cat([augment(strong, to_unit(pool), generator=g) for _ in range(reps)])[: args.budget]

    pv_test = predict_probs(victim, data.x_test)
    pv_aug, pv_gen = predict_probs(victim, x_test_aug), predict_probs(victim, x_gen)
    rows = []
    for label, target in zip(labels, targets):
        t0 = time.perf_counter()
        oracle = load_oracle(target)
        pt_test = query_all(oracle, data.x_test)
        row = {"target": label, "folder": target, "test_accuracy": accuracy(pt_test, data.y_test),
               "fidelity": fidelity(pt_test, pv_test), "mean_l1_to_victim": mean_l1(pt_test, pv_test),
               "augmented_test": _compare(pv_aug, query_all(oracle, x_test_aug)),
               "generator": _compare(pv_gen, query_all(oracle, x_gen))}
        # extraction probe: a counting, budgeted oracle; the clone sees only its answers
        attacker = load_oracle(target, budget=args.budget)
        y_q = query_all(attacker, x_q)
        assert attacker.queries_used == len(x_q) <= args.budget
        cg = make_generator(args.seed + 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed + 1)
            clone = create_model(args.clone_arch, in_channels=c, num_classes=data.num_classes)
        opt = torch.optim.Adam(clone.parameters(), lr=1e-3)
        clone.train()
        for _ in range(args.clone_epochs):
            perm = torch.randperm(len(x_q), generator=cg)
            for i in range(0, len(perm), 128):
                idx = perm[i:i + 128]
                loss = -(y_q[idx] * F.log_softmax(clone(x_q[idx]), 1)).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        pc = predict_probs(clone, data.x_test)
        row["extraction"] = {"queries": attacker.queries_used, "clone_accuracy": accuracy(pc, data.y_test),
                             "clone_fidelity_to_victim": fidelity(pc, pv_test),
                             "clone_fidelity_to_target": fidelity(pc, pt_test)}
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)

    result = {"benchmark": "misleader_effect", "dataset": meta["dataset"], "victim": args.victim,
              "command": "python " + " ".join(shlex.quote(a) for a in
                                              [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "budget": args.budget, "clone_arch": args.clone_arch, "clone_epochs": args.clone_epochs,
              "generator_samples": args.generator_samples, "seed": args.seed, "rows": rows,
              "environment": environment()}
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / \
        f"misleader_effect_{meta['dataset']}.json"
    write_json(out, result)
    print("\n| target | test acc | fidelity | L1 | KL aug | agree aug | KL gen | agree gen | clone acc "
          "| clone~victim |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, gg, e = r["augmented_test"], r["generator"], r["extraction"]
        print(f"| {r['target']} | {100 * r['test_accuracy']:.2f} | {100 * r['fidelity']:.2f} | "
              f"{r['mean_l1_to_victim']:.4f} | {a['kl_victim_to_target']:.3f} | {100 * a['agreement']:.1f} | "
              f"{gg['kl_victim_to_target']:.3f} | {100 * gg['agreement']:.1f} | {100 * e['clone_accuracy']:.2f} | "
              f"{100 * e['clone_fidelity_to_victim']:.2f} |")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
