"""Serve cost of every output defense step next to the undefended oracle, and MAD batched vs its reference.

For each step (RandP, MAD, GRAD², the postprocessors, the Adaptive Misinformation gate) it times
``victim softmax -> step`` over the same rows in batches, under ``torch.inference_mode()`` as an oracle
runs them, against plain ``victim softmax``; the configurations alternate within each round (so load
from other processes hits all alike) and rows/s are of the median round. Surrogates, the detector and
the misinformation model are LeNet5-sized (the victim's architecture).

Then MAD's batched closed form against the per-example autograd-Jacobian reference
(:func:`misleader.defenses.mad.mad_reference`) on the same ``--mad-rows`` queries, for both oracles and
both objectives: rows/s of each and the largest difference of their answers. Both paths use the same
surrogate as the step holds it (:func:`~misleader.defenses.mad.prepare_surrogate`); the batched path runs
as :class:`~misleader.defenses.mad.MADStep` does (chunked forward, then the oracle). The split of each
path's time is recorded too: the batched path's surrogate forward, and the reference's Jacobians (one
forward and K backward passes per query); ``speedup_bound_free_oracle_cpu_time`` = reference time / batched forward
time, the speedup if the batched oracle cost nothing. Each time is recorded as wall-clock seconds (the rows/s)
and as this process's CPU seconds (``time.process_time``, one thread: what the load of other processes on
a shared machine leaves out); the batched path is timed 3 times before the reference and 3 times after.

Usage::

    OMP_NUM_THREADS=1 python bench/bench_output_defenses.py                   # random LeNet5, MNIST test rows
    OMP_NUM_THREADS=1 python bench/bench_output_defenses.py --victim runs/v_mnist

Writes ``bench/results/output_defenses.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from misleader.data.loader import to_unit
from misleader.defenses.mad import (CPU_CHUNK, jacobian_last_layer, mad_batched, mad_reference, prepare_surrogate,
                                    surrogate_features)
from misleader.models import create_model
from misleader.oracle.steps import STEPS, StepContext
from misleader.utils import environment, resolve_device, write_json

CONFIGS: list[tuple[str, dict]] = [
    ("randp", {"epsilon": 0.5}),
    ("randp", {"epsilon": 1.0, "form": "logit"}),
    ("mad", {"epsilon": 0.5, "oracle": "extreme", "objective": "angular", "surrogate": "s"}),
    ("mad", {"epsilon": 0.5, "oracle": "argmax", "objective": "angular", "surrogate": "s"}),
    ("grad2", {"epsilon": 0.5, "target": "all_ones", "surrogates": ["s"]}),
    ("grad2", {"epsilon": 0.5, "target": "min_ip", "surrogates": ["s"]}),
    ("reverse_sigmoid", {"beta": 0.7, "gamma": 0.4}),
    ("round", {"decimals": 2}),
    ("top_k", {"k": 1}),
    ("labels", {}),
    ("gaussian", {"scale": 0.2}),
    ("adaptive_misinfo", {"tau": 0.9, "nu": 1000.0, "misinfo": "s", "detector": "d"}),
]


def _label(type_name: str, spec: dict) -> str:
    keys = [f"{k}={v}" for k, v in spec.items() if k not in ("surrogate", "surrogates", "misinfo", "detector")]
    return f"{type_name}({', '.join(keys)})"


def _inputs(n: int, *, data_dir: str | None) -> tuple[torch.Tensor, str]:
    try:
        from misleader.data.datasets import load_dataset

        return to_unit(load_dataset("mnist", data_dir=data_dir).x_test[:n]), "mnist test rows"
    except Exception:  # noqa: BLE001 - no data: random images cost the same
        return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(0)), "uniform random images"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--victim", default=None, help="victim folder (default: a randomly initialised MNIST LeNet5)")
    p.add_argument("--rows", type=int, default=2048, help="rows per timed pass")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--mad-rows", type=int, default=1000, help="queries for MAD batched vs reference")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    import misleader.defenses  # noqa: F401  (registers the steps)

    if args.victim:
        from misleader.training.checkpoint import load_model

        victim, meta = load_model(args.victim, device=dev)
        arch = meta["arch"]
    else:
        torch.manual_seed(0)
        arch = "lenet5"
        victim = create_model(arch, in_channels=1, num_classes=10).to(dev).eval()
    models = {}
    for i, name in enumerate(("s", "d")):
        torch.manual_seed(100 + i)
        models[name] = create_model(arch, in_channels=1, num_classes=10).to(dev).eval()
    # each step gets its own copy of a named model (MAD turns its surrogate's layout to channels-last in place)
    ctx = StepContext(folder=Path("."), device=dev, generator=torch.Generator(device=dev).manual_seed(0),
                      num_classes=10, input_shape=(1, 32, 32), load_model=lambda n: copy.deepcopy(models[n]))
    steps = {_label(t, s): STEPS.get(t).from_manifest(s, ctx=ctx) for t, s in CONFIGS}
    x, source = _inputs(args.rows, data_dir=args.data_dir)
    x = x.to(dev)

    def run(step) -> None:  # noqa: ANN001
        with torch.inference_mode():
            for xb in x.split(args.batch_size):
                y = torch.softmax(victim(xb).float(), dim=1)
                if step is None:
                    continue
                if step.kind == "gate":
                    a = step.weight(y, xb)[:, None]
                    y = (1 - a) * y + a * step.branch(xb)
                else:
                    y = step(y, xb)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    names = ["undefended", *steps]
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up
        run(steps.get(n))
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t0 = time.perf_counter()
            run(steps.get(n))
            times[n].append(time.perf_counter() - t0)
    base = args.rows / statistics.median(times["undefended"])
    serve = {n: {"rows_per_s": args.rows / statistics.median(ts), "ratio_to_undefended":
                 (args.rows / statistics.median(ts)) / base} for n, ts in times.items()}

    # MAD: batched closed form against the per-example autograd-Jacobian reference on the same queries.
    # Speed: both as they run (float32 surrogate; the batched path's oracle in float64, as the step).
    # Equality: both in float64 (with a float32 Jacobian, near-tied candidates, e.g. the plain objective
    # on confident answers where the non-top classes all have ~1e-8, can flip between equal optima).
    xm = x[: args.mad_rows]
    with torch.inference_mode():
        ym = torch.softmax(victim(xm).float(), dim=1)
    ym = ym.clone()
    surrogate = prepare_surrogate(copy.deepcopy(models["s"]))  # as MADStep holds it
    surrogate64 = create_model(arch, in_channels=1, num_classes=10).double().eval()
    surrogate64.load_state_dict(surrogate.state_dict())
    prepare_surrogate(surrogate64)
    chunk = CPU_CHUNK if dev.type == "cpu" else None

    def clocks() -> tuple[float, float]:  # wall, and this process's CPU time (what other processes' load leaves out)
        return time.perf_counter(), time.process_time()

    def timed(fn, repeats: int) -> tuple[float, float]:  # noqa: ANN001
        """Median wall and CPU seconds of ``repeats`` calls."""
        wall, cpu = [], []
        for _ in range(repeats):
            w0, c0 = clocks()
            fn()
            w1, c1 = clocks()
            wall.append(w1 - w0)
            cpu.append(c1 - c0)
        return statistics.median(wall), statistics.median(cpu)

    with torch.no_grad():
        surrogate_features(surrogate, xm, chunk=chunk)  # warm-up
    jac_wall, jac_cpu = timed(lambda: [jacobian_last_layer(surrogate, xm[i : i + 1]) for i in range(len(xm))], 1)
    mad = {}
    for oracle in ("extreme", "argmax"):
        for objective in ("angular", "plain"):
            kw = {"epsilon": 0.5, "oracle": oracle, "objective": objective}
            fast: dict[str, list[float]] = {"wall": [], "cpu": [], "forward_wall": [], "forward_cpu": []}

            def batched(model: torch.nn.Module, xs: torch.Tensor, *, record: bool = False) -> torch.Tensor:
                with torch.no_grad():
                    w0, c0 = clocks()
                    p_s, h = surrogate_features(model, xs, chunk=chunk)
                    w1, c1 = clocks()
                    out = mad_batched(ym, p_s, h, **kw)
                    w2, c2 = clocks()
                if record:
                    for key, val in (("wall", w2 - w0), ("cpu", c2 - c0), ("forward_wall", w1 - w0),
                                     ("forward_cpu", c1 - c0)):
                        fast[key].append(val)
                return out

            batched(surrogate, xm)  # warm-up (candidate tables)
            for _ in range(3):  # 3 runs before the reference and 3 after, so a change of load hits both sides
                batched(surrogate, xm, record=True)
            slow_wall, slow_cpu = timed(lambda: mad_reference(surrogate, xm, ym, **kw), 1)
            for _ in range(3):
                batched(surrogate, xm, record=True)
            f = {k: statistics.median(v) for k, v in fast.items()}
            diff = batched(surrogate64, xm.double()) - mad_reference(surrogate64, xm.double(), ym, **kw)
            mad[f"{oracle}/{objective}"] = {
                "batched_rows_per_s": len(xm) / f["wall"], "reference_rows_per_s": len(xm) / slow_wall,
                "speedup": slow_wall / f["wall"], "speedup_cpu_time": slow_cpu / f["cpu"],
                "max_abs_diff_float64": float(diff.abs().max()),
                "batched_s": f["wall"], "batched_cpu_s": f["cpu"], "batched_forward_s": f["forward_wall"],
                "batched_forward_cpu_s": f["forward_cpu"], "reference_s": slow_wall, "reference_cpu_s": slow_cpu,
                "reference_jacobian_s": jac_wall, "reference_jacobian_cpu_s": jac_cpu,
                "speedup_bound_free_oracle_cpu_time": slow_cpu / f["forward_cpu"]}

    result = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "arch": arch,
              "victim": args.victim or "random lenet5", "inputs": source, "rows": args.rows,
              "batch_size": args.batch_size, "rounds": args.rounds, "threads": args.threads, "device": str(dev),
              "load_average": os.getloadavg(), "serve": serve, "mad_batched_vs_reference": mad,
              "environment": environment()}
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "output_defenses.json"
    write_json(out, result)
    print(f"{'defense step':55s} {'rows/s':>10s} {'x undefended':>13s}")
    for n, s in serve.items():
        print(f"{n:55s} {s['rows_per_s']:10.0f} {s['ratio_to_undefended']:13.2f}")
    print(f"\nMAD on {len(xm)} queries: {'batched rows/s':>15s} {'reference rows/s':>17s} {'speedup':>8s} "
          f"{'(cpu time)':>10s} {'max diff':>9s} {'bound':>6s}")
    print("(bound: the cpu-time speedup if the batched oracle cost nothing, i.e. reference / batched forward)")
    for n, m in mad.items():
        print(f"{n:24s} {m['batched_rows_per_s']:15.0f} {m['reference_rows_per_s']:17.1f} {m['speedup']:8.0f} "
              f"{m['speedup_cpu_time']:10.0f} {m['max_abs_diff_float64']:9.1e} "
              f"{m['speedup_bound_free_oracle_cpu_time']:6.0f}")
        print(f"{'':24s} batched {m['batched_cpu_s']:.4f} cpu-s (surrogate forward {m['batched_forward_cpu_s']:.4f}); "
              f"reference {m['reference_cpu_s']:.3f} cpu-s (Jacobians alone {m['reference_jacobian_cpu_s']:.3f})")
    print(f"load average {os.getloadavg()}; wrote {out}")
    return json.loads(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
