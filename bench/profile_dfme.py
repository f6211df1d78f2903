"""Profile or time DFME (default preset) on the grid MNIST LeNet5 victim. Env: B budget, T threads, PROF=1 (torch.profiler table), SHAPES=1, ROWS, OPTS (json options). cpu_qps = queries per process CPU second (robust to a loaded machine at 1 thread)."""
import os, sys, time, json
import torch
torch.set_num_threads(int(os.environ.get("T", "1")))
from misleader.oracle import open_accounted
from misleader.attacks.dfme import DFME
from misleader.models import create_model
V = "/work/runs/grid/victims/mnist-lenet5-s0-aedbbacf33"
budget = int(os.environ.get("B", "20000"))
opts = json.loads(os.environ.get("OPTS", "{}"))
def once(profile=False):
    o, _ = open_accounted(V, output="probs", budget=budget, device="cpu")
    shape = o.input_shape
    torch.manual_seed(0)
    clone = create_model("lenet5", in_channels=shape[0], num_classes=10, mean=[0.5], std=[0.5])
    a = DFME(**opts); a.adapt_to_target({"dataset": "mnist", "input_shape": list(shape), "num_classes": 10})
    t0 = time.perf_counter(); c0 = time.process_time()
    if profile:
        from torch.profiler import profile as P, ProfilerActivity
        with P(activities=[ProfilerActivity.CPU], record_shapes=bool(int(os.environ.get("SHAPES","0")))) as prof:
            r = a.run(o.sealed(), budget=budget, clone=clone, generator=torch.Generator().manual_seed(0))
        print(prof.key_averages(group_by_input_shape=bool(int(os.environ.get("SHAPES","0")))).table(sort_by="self_cpu_time_total", row_limit=int(os.environ.get("ROWS", "30"))))
    else:
        r = a.run(o.sealed(), budget=budget, clone=clone, generator=torch.Generator().manual_seed(0))
    dt = time.perf_counter() - t0; global cpu; cpu = time.process_time() - c0
    return r, dt, clone
r, dt, clone = once(profile=bool(int(os.environ.get("PROF", "0"))))
h = sum(float(p.detach().double().sum()) for p in clone.parameters())
print(json.dumps({"queries": r.queries_used, "seconds": round(dt, 2), "qps": round(r.queries_used / dt, 1), "cpu_qps": round(r.queries_used / cpu, 1), "src": __import__("misleader").__file__,
                  "loss_clone": r.extra["loss_clone"], "param_sum": h, "load": os.getloadavg()}))
