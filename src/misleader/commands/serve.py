"""misleader serve: answer predictions of a victim or defense folder over HTTP (keys, budgets, PoW, detector)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from misleader.commands.common import positive_int
from misleader.errors import MisleaderError

log = logging.getLogger(__name__)


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "serve", help="serve a victim or defense folder over HTTP with API keys, exact budgets and proof-of-work",
        description="Start the gateway (FastAPI + uvicorn): POST /v1/predict (JSON or .npy), GET /v1/model, "
                    "/v1/usage, /healthz, /metrics, / (status page, admin key). Create keys with `misleader keys`.")
    p.add_argument("folder", help="victim folder (train-victim) or defense folder (defend)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--db", default=None,
                   help="store: a SQLite file, sqlite:///PATH or postgresql://... "
                        "(default: FOLDER.gateway.sqlite3 beside the folder)")
    p.add_argument("--output", choices=["probs", "labels"], default="probs", help="what clients get (default probs)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    p.add_argument("--max-rows", type=positive_int, default=1024, help="rows per request at most (default 1024)")
    pow_ = p.add_mutually_exclusive_group()
    pow_.add_argument("--pow", default=None, metavar="DIR", help="proof-of-work config folder (DIR/pow.json)")
    pow_.add_argument("--pow-bits", type=int, default=None, metavar="N", help="fixed proof-of-work bits per batch")
    p.add_argument("--pow-secret-file", default=None,
                   help="file holding the HMAC secret of PoW challenges (share it between replicas; default: "
                        "$MISLEADER_POW_SECRET or a random secret per process)")
    p.add_argument("--detector", default=None, metavar="S",
                   help="SAME detector folder (`misleader detect same train --out S`): every row is scored, per-key "
                        "statistics kept and --policy applied to the rows above its threshold")
    p.add_argument("--policy", choices=["log", "gate", "refuse"], default=None,
                   help="what flagged rows get (with --detector; default log): log = the normal answer, gate = the "
                        "answer of --gate-folder, refuse = no answer (per row; released, not counted)")
    p.add_argument("--gate-folder", default=None, metavar="X",
                   help="defense folder answering flagged rows (--policy gate), built on the same victim")
    p.add_argument("--flag-fraction", type=float, default=0.5,
                   help="a key is a flagged client above this fraction of flagged rows (default 0.5)")
    p.add_argument("--flag-min-rows", type=positive_int, default=100,
                   help="... once it has at least this many scored rows (default 100)")
    p.add_argument("--ray", action="store_true",
                   help="run under Ray Serve (pip install 'ray[serve]'); several replicas need a shared "
                        "--db postgresql://... store and, with proof-of-work, --pow-secret-file")
    p.add_argument("--replicas", type=positive_int, default=1, help="Ray Serve replicas (with --ray)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="server processes on this machine (uvicorn workers, one model and one store connection "
                        "pool each; default 1). Budgets stay exact (one store); --rate and /metrics are per "
                        "process")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (with --ray)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (with --ray; default $RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--reservation-timeout", type=float, default=None, metavar="SECONDS",
                   help="release a reservation whose request has not finished after this long (default 120)")
    p.add_argument("--max-batch-rows", type=int, default=256, metavar="N",
                   help="answer concurrent requests together, in forward passes of at most N rows "
                        "(default 256; 0: one pass per request)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    p.set_defaults(func=run)


def pow_secret(path: str | None) -> bytes | None:
    """The PoW HMAC secret from a file or ``$MISLEADER_POW_SECRET`` (``None``: a random one)."""
    if path:
        from misleader.oracle.manifest import check_regular_file

        data = check_regular_file(Path(path), what="PoW secret file").read_bytes().strip()
    else:
        data = os.environ.get("MISLEADER_POW_SECRET", "").encode()
        if not data:
            return None
    if len(data) < 16:
        raise MisleaderError("the PoW secret must be at least 16 bytes: write e.g. `openssl rand -hex 32` to it")
    return data


def build(args: argparse.Namespace):  # noqa: ANN201 - (FastAPI app, Store, db url)
    from misleader.serving.app import GatewayConfig, create_app
    from misleader.serving.policy import FixedBits, load_pow_policy
    from misleader.serving.store import Store, default_db

    if args.detector is None and (args.policy is not None or args.gate_folder is not None):
        raise MisleaderError("--policy and --gate-folder need --detector S (a SAME detector folder)")
    policy = args.policy or "log"
    if (policy == "gate") != (args.gate_folder is not None):
        raise MisleaderError("--policy gate needs --gate-folder X (and --gate-folder needs --policy gate)")
    if not Path(args.folder).is_dir():
        raise MisleaderError(f"{args.folder} is not a folder: pass a victim or defense folder")
    pow_policy = None
    if args.pow is not None:
        pow_policy = load_pow_policy(args.pow)
    elif args.pow_bits is not None:
        from misleader.pow.puzzle import check_bits

        try:
            pow_policy = FixedBits(check_bits(args.pow_bits))
        except ValueError as exc:
            raise MisleaderError(f"--pow-bits: {exc}") from None
    detector = None
    if args.detector is not None:
        from misleader.serving.policy import load_detector_policy

        for what, path in (("--detector", args.detector), ("--gate-folder", args.gate_folder)):
            if path is not None and not Path(path).is_dir():
                raise MisleaderError(f"{what} {path} is not a folder")
        detector = load_detector_policy(args.detector, served_folder=args.folder, policy=policy,
                                        gate_folder=args.gate_folder, output=args.output, device=args.device,
                                        flag_fraction=args.flag_fraction, flag_min_rows=args.flag_min_rows)
    db = args.db or default_db(args.folder)
    store = Store(db)
    cfg = GatewayConfig(output=args.output, device=args.device, max_rows=args.max_rows, pow=pow_policy,
                        detector=detector, max_batch_rows=max(0, args.max_batch_rows))
    secret = pow_secret(args.pow_secret_file)
    if args.reservation_timeout is not None:
        cfg.reservation_timeout = args.reservation_timeout
    if secret is not None:
        cfg.pow_secret = secret
    return create_app(folder=args.folder, store=store, config=cfg), store, db


def _replica_app(settings: dict):  # noqa: ANN202 - the FastAPI app of one Ray Serve replica
    """Build the gateway app on a Ray Serve replica from the command line's settings (plain values only)."""
    return build(argparse.Namespace(**settings))[0]


def check_ray(args: argparse.Namespace) -> None:
    """Refuse Ray Serve settings whose replicas could not share their state (one line, with the fix)."""
    if not args.ray:
        if args.replicas != 1 or args.ray_address is not None:
            raise MisleaderError("--replicas and --ray-address need --ray")
        return
    if args.replicas > 1 and not (args.db or "").startswith(("postgresql://", "postgres://")):
        raise MisleaderError(f"--ray --replicas {args.replicas}: replicas must share one store: "
                             "pass --db postgresql://USER@HOST/DB")
    if args.replicas > 1 and (args.pow or args.pow_bits is not None) and pow_secret(args.pow_secret_file) is None:
        raise MisleaderError("--ray with proof-of-work: replicas must sign challenges with one secret: pass "
                             "--pow-secret-file FILE (or set $MISLEADER_POW_SECRET)")
    if not args.replica_cpus > 0:
        raise MisleaderError(f"--replica-cpus must be > 0, got {args.replica_cpus}")


#: the environment variable that hands the command line's settings to each uvicorn worker process
WORKER_SETTINGS_ENV = "MISLEADER_SERVE_SETTINGS"


def worker_app():  # noqa: ANN201 - the FastAPI app of one uvicorn worker (``--workers N``)
    """Build the gateway app in a uvicorn worker process from the settings the parent left in the environment."""
    import json

    return build(argparse.Namespace(**json.loads(os.environ[WORKER_SETTINGS_ENV])))[0]


def run_workers(args: argparse.Namespace) -> int:
    """``--workers N``: N uvicorn processes sharing the listening socket and the store (module docstring)."""
    import json
    import secrets

    import uvicorn

    if args.ray:
        raise MisleaderError("--workers is for one machine without Ray; with --ray use --replicas")
    _, store, _ = build(args)  # every check of the settings, once, here (each worker builds its own app)
    print(f"misleader: serving {args.folder} on http://{args.host}:{args.port} with {args.workers} worker "
          f"processes (store {store._safe_url()})", flush=True)
    store.close()
    if (args.pow or args.pow_bits is not None) and pow_secret(args.pow_secret_file) is None:
        # a challenge issued by one worker is verified by whichever worker gets the resent batch: one secret
        os.environ["MISLEADER_POW_SECRET"] = secrets.token_hex(32)
    os.environ[WORKER_SETTINGS_ENV] = json.dumps({**vars(args), "func": None, "workers": 1})
    uvicorn.run("misleader.commands.serve:worker_app", factory=True, workers=args.workers, host=args.host,
                port=args.port, log_level=args.log_level)
    return 0


def run(args: argparse.Namespace) -> int:
    import uvicorn

    check_ray(args)
    if args.workers > 1:
        return run_workers(args)
    if args.ray:
        import functools

        from misleader.serving import ray_serve

        _, store, _ = build(args)  # every check of the settings, once, here (each replica builds its own app)
        store.close()
        settings = {**vars(args), "ray": False, "func": None}
        ray_serve.run(build_app=functools.partial(_replica_app, settings), replicas=args.replicas, host=args.host,
                      port=args.port, address=args.ray_address or os.environ.get("RAY_ADDRESS"),
                      cpus_per_replica=args.replica_cpus)
        return 0
    app, store, db = build(args)
    log.info("serving %s on http://%s:%d (store %s)", args.folder, args.host, args.port, store._safe_url())
    print(f"misleader: serving {args.folder} on http://{args.host}:{args.port} (store {store._safe_url()})",
          flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        store.close()
    return 0
