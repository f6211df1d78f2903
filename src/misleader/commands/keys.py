"""misleader keys: create, list, revoke API keys and set their budgets (the store keeps hashes only)."""

from __future__ import annotations

import argparse
import json

from misleader.errors import MisleaderError


def budget_arg(s: str) -> int | None:
    if s in ("unlimited", "none"):
        return None
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be an integer >= 0 or 'unlimited', got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"budget must be >= 0, got {v}")
    return v


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("keys", help="manage the gateway's API keys and budgets",
                       description="API keys of `misleader serve`. A new key is printed once; only its sha256 is "
                                   "stored.")
    ks = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    a = ks.add_parser("add", help="create a key (printed once)")
    a.add_argument("name")
    a.add_argument("--budget", type=budget_arg, required=True, help="rows this key may ever get, or 'unlimited'")
    a.add_argument("--rate", default=None, help="rate limit, e.g. 100/second or 1000/hour (default none)")
    a.add_argument("--admin", action="store_true", help="may read the status page")
    lst = ks.add_parser("list", help="list keys with usage")
    r = ks.add_parser("revoke", help="revoke a key (403 from now on)")
    r.add_argument("name")
    s = ks.add_parser("set-budget", help="change a key's budget")
    s.add_argument("name")
    s.add_argument("budget", type=budget_arg)
    for q in (a, lst, r, s):
        q.add_argument("--db", required=True, help="the server's store: SQLite file, sqlite:///PATH or postgresql://...")
    p.set_defaults(func=run)


def _row(k) -> dict:  # noqa: ANN001
    return {"name": k.name, "id": k.id, "budget": k.budget, "used": k.used, "reserved": k.reserved,
            "remaining": k.remaining, "rate": k.rate, "admin": k.admin, "revoked": k.revoked}


def run(args: argparse.Namespace) -> int:
    from misleader.serving.keys import create_key
    from misleader.serving.store import Store

    store = Store(args.db)
    try:
        if args.keys_command == "add":
            key, rec = create_key(store, name=args.name, budget=args.budget, rate=args.rate, admin=args.admin)
            print(json.dumps({**_row(rec), "key": key}, indent=2))
            print("store this key now: it is not shown again", flush=True)
        elif args.keys_command == "list":
            print(json.dumps([_row(k) for k in store.list_keys()], indent=2))
        elif args.keys_command == "revoke":
            print(json.dumps(_row(store.revoke(args.name)), indent=2))
        elif args.keys_command == "set-budget":
            print(json.dumps(_row(store.set_budget(args.name, args.budget)), indent=2))
        else:  # pragma: no cover - argparse enforces the choices
            raise MisleaderError(f"unknown keys action {args.keys_command!r}")
    finally:
        store.close()
    return 0
