"""misleader query: ask a running gateway about a batch from a file (for a person at a terminal)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from misleader.errors import MisleaderError


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("query", help="send a batch (.npy or .json) to a running `misleader serve`",
                       description="Print the server's answer to the batch in FILE: an .npy array (N, *input_shape) "
                                   "or a JSON file {\"inputs\": [...]}, floats in [0, 1].")
    p.add_argument("url", help="http://HOST:PORT of the server")
    p.add_argument("--api-key", default=None, help="API key (default: $MISLEADER_API_KEY)")
    p.add_argument("--input", required=True, help="the batch: FILE.npy or FILE.json")
    p.add_argument("--out", default=None, help="also save the answer as .npy here")
    p.set_defaults(func=run)


def read_batch(path: Path):  # noqa: ANN201 - numpy array
    from misleader.oracle.manifest import check_regular_file
    from misleader.serving.schemas import BadBatch, parse_json_batch, parse_npy_batch

    data = check_regular_file(path, what="input file").read_bytes()
    try:
        return parse_json_batch(data) if path.suffix.lower() == ".json" else parse_npy_batch(data)
    except BadBatch as exc:
        raise MisleaderError(f"{path}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from misleader.serving.client import connect

    key = args.api_key or os.environ.get("MISLEADER_API_KEY")
    if not key:
        raise MisleaderError("pass --api-key KEY or set MISLEADER_API_KEY")
    x = torch.from_numpy(np.ascontiguousarray(read_batch(Path(args.input))))
    oracle = connect(args.url, api_key=key)
    try:
        try:
            out = oracle.query(x)
        except ValueError as exc:
            raise MisleaderError(f"{args.input}: {exc}") from None
        usage = oracle.usage()
    finally:
        oracle.close()
    if args.out:
        from misleader.utils import atomic_write_bytes
        from misleader.serving.schemas import npy_bytes

        atomic_write_bytes(args.out, npy_bytes(out.numpy()))
    res = {"output": oracle.output, "rows": int(out.shape[0]), "remaining": usage["remaining"],
           "outputs": out.tolist()}
    if oracle.output == "probs":
        res["labels"] = out.argmax(1).tolist()
    if oracle.pow_bits:
        res["pow_bits"], res["pow_seconds"] = oracle.pow_bits, round(oracle.pow_seconds, 3)
    print(json.dumps(res))
    return 0
