"""Benchmark: images/s of one LeNet5 training epoch on MNIST (the victim recipe), and query throughput.

Usage: .venv/bin/python bench/bench_victim_epoch.py [--data-dir ../shared/data] [--threads 2] [--device cpu]
Writes bench/results/victim_epoch.json. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from misleader.data import SplitSpec, load_dataset, make_splits
from misleader.models import create_model
from misleader.oracle import ModelOracle
from misleader.data.loader import to_unit
from misleader.training.train import train_classifier
from misleader.training.train import MNIST_RECIPE
from misleader.utils import resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", default=os.environ.get("MISLEADER_DATA", "../shared/data"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench/results/victim_epoch.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    d = load_dataset("mnist", data_dir=args.data_dir)
    s = make_splits(len(d.y_train), SplitSpec())
    model = create_model("lenet5", in_channels=1, num_classes=10, mean=[0.1], std=[0.275])
    x, y = d.x_train[s.train], d.y_train[s.train]
    t0 = time.perf_counter()
    res = train_classifier(model, x_train=x, y_train=y, x_val=d.x_train[s.val][:10], y_val=d.y_train[s.val][:10],
                           epochs=1, recipe=MNIST_RECIPE, device=dev, generator=torch.Generator().manual_seed(0))
    epoch_s = time.perf_counter() - t0
    oracle = ModelOracle(model, num_classes=10, input_shape=(1, 32, 32), device=dev)
    xq = to_unit(d.x_test)
    oracle.query(xq[:512])
    t0 = time.perf_counter()
    for chunk in xq.split(512):
        oracle.query(chunk)
    q_s = time.perf_counter() - t0
    out = {
        "what": "LeNet5 victim epoch on MNIST (45k defender images, adam b128 crop2) and oracle query throughput",
        "device": str(dev), "threads": args.threads, "train_images": len(y),
        "epoch_seconds": round(epoch_s, 2), "train_images_per_s": round(len(y) / epoch_s),
        "query_rows_per_s": round(len(xq) / q_s), "load_avg_1min": os.getloadavg()[0],
        "torch": torch.__version__, "val_acc_after_1_epoch": res.best_val_accuracy,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
