"""Benchmark of the HTTP gateway: exact budgets under concurrency, latency, throughput, kill -9 recovery.

Phases, for each store (SQLite; PostgreSQL when ``--pg URL`` or ``$MISLEADER_TEST_PG`` is given):

1. **accounting**: ``--clients`` concurrent clients send ``--requests`` single-row requests in all
   (or ``--requests-per-client`` each: the acceptance's 32 x 10,000 is ``--clients 32
   --requests-per-client 10000``), spread over ``--keys`` keys whose budgets are below the rows asked
   (so the end of the run is refused with 429). Checks: per key, rows answered to the clients == the
   store's ``used`` == the query log's rows, ``used <= budget``, no reservation left. Reports p50/p99
   latency of answered single-row requests and requests/s.
2. **throughput**: 64-row ``.npy`` requests by ``--throughput-clients`` clients; rows/s divided by the
   rows/s of the in-process oracle on the same batches, measured in the same run just before and just
   after the HTTP phase (their mean; goal >= 0.7).
3. **kill** (``--kill``): kill -9 the server in the middle of a load, restart it on the same store with
   a short reservation timeout and check the store: no reservation left beyond its timeout, no
   negative or over-budget count, ``used`` == the log's rows.

``--profile`` instead measures the CPU time of each piece of one 64-row request in process (parsing,
checks, sha256, the store's transactions, encoding, the model, the handler, the ASGI app).

The load generator runs on the same machine: ``--http-client raw`` (default) is a minimal asyncio
HTTP/1.1 keep-alive client, so that the clients' own CPU takes less from the server's cores than
``--http-client httpx`` (httpx.AsyncClient) does. Every phase records ``os.getloadavg()``.

Usage:
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/bench_gateway.py [--target DIR]
        [--clients 32] [--requests 10000 | --requests-per-client N] [--throughput-clients 4]
        [--pg postgresql://...] [--kill] [--profile] [--out bench/results/gateway.json]
Without ``--target`` a tiny victim (lenet5_fifth on the embedded digits) is trained first. Not a test:
the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: extra `misleader serve` arguments for every server the bench starts (``--ray-replicas N`` sets them)
SERVER_EXTRA: list[str] = []
#: seconds to wait for a server to answer /healthz (Ray Serve starts its cluster and replicas first)
START_WAIT_S = 60.0


def start_server(folder: Path, db: str, *extra: str) -> tuple[subprocess.Popen, str]:
    import httpx

    extra = (*SERVER_EXTRA, *extra)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "misleader", "-q", "serve", str(folder), "--port", str(port),
                             "--db", db, "--device", "cpu", "--log-level", "error", *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited at start")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server did not start")


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams (one connection, one request at a time).

    The load generator runs on the same machine as the server: httpx's per-request CPU (about a
    millisecond) is taken from the server's cores, so ``--http-client raw`` (this) sends the same bytes
    with far less client work; ``--http-client httpx`` is kept for comparison.
    """

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.head}Content-Length: {len(body)}"
                          "\r\n\r\n".encode() + body)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            data = await self.reader.readexactly(int(hdrs.get("content-length", "0")))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
            await self.close()
            raise ConnectionError(str(exc) or type(exc).__name__) from None
        if hdrs.get("connection", "").lower() == "close":
            await self.close()
        return status, hdrs, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def load(url: str, keys: list[str], *, clients: int, requests: int, rows: int, shape: tuple[int, ...],
               stop_after: float | None = None, per_client: int | None = None, http_client: str = "raw") -> dict:
    """``clients`` tasks share ``requests`` requests of ``rows`` rows (or each sends ``per_client``);
    key of client i: keys[i % len(keys)]."""
    import httpx

    rng = np.random.default_rng(0)
    bodies = [npy(rng.random((rows, *shape), dtype=np.float32)) for _ in range(8)]
    answered = {k: 0 for k in keys}
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    shared = iter(range(requests))
    t_start = time.perf_counter()
    errors = 0

    async def client(i: int) -> None:
        nonlocal errors
        key = keys[i % len(keys)]
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-npy"}
        if http_client == "raw":
            raw = RawHttp(url, headers)
        else:
            http = httpx.AsyncClient(base_url=url, timeout=60, headers=headers)
        todo = shared if per_client is None else iter(range(per_client))
        try:
            for j in todo:
                if stop_after is not None and time.perf_counter() - t_start > stop_after:
                    return
                t0 = time.perf_counter()
                try:
                    if http_client == "raw":
                        code, hdrs, _ = await raw.post("/v1/predict", bodies[j % len(bodies)])
                    else:
                        r = await http.post("/v1/predict", content=bodies[j % len(bodies)])
                        code, hdrs = r.status_code, r.headers
                except (httpx.HTTPError, OSError):
                    errors += 1
                    if stop_after is not None:
                        return
                    continue
                dt = time.perf_counter() - t0
                statuses[code] = statuses.get(code, 0) + 1
                if code == 200:
                    latencies.append(dt)
                    answered[key] += int(hdrs["x-rows"])
        finally:
            if http_client == "raw":
                await raw.close()
            else:
                await http.aclose()

    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t_start
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {"answered": answered, "statuses": statuses, "wall_s": wall, "errors": errors,
            "p50_ms": float(np.percentile(lat, 50) * 1000), "p99_ms": float(np.percentile(lat, 99) * 1000),
            "requests_per_s": sum(statuses.values()) / wall, "rows_per_s": sum(answered.values()) / wall,
            "load_after": os.getloadavg()}


def check_store(db: str, names: dict[str, str], answered: dict[str, int] | None) -> dict:
    """Per key: used, reserved, budget, logged rows (and rows answered to clients); consistency flags."""
    from misleader.serving.store import Store

    s = Store(db)
    try:
        per = {}
        ok = True
        for key, name in names.items():
            k = s.get_key(name)
            logged = s.logged_rows(k.id)
            row = {"used": k.used, "reserved": k.reserved, "budget": k.budget, "logged": logged}
            good = k.used == logged and k.used >= 0 and k.reserved >= 0 and (k.budget is None or k.used <= k.budget)
            if answered is not None:
                row["answered"] = answered[key]
                good = good and answered[key] == k.used
            per[name] = row
            ok = ok and good
        pending = s.pending_reservations()
        return {"consistent": ok and pending == 0, "pending_reservations": pending, "keys": per}
    finally:
        s.close()


def make_keys(db: str, n: int, budget: int | None, tag: str) -> dict[str, str]:
    from misleader.serving.keys import create_key
    from misleader.serving.store import Store

    s = Store(db)
    try:
        return {create_key(s, name=f"{tag}{i}", budget=budget)[0]: f"{tag}{i}" for i in range(n)}
    finally:
        s.close()


def in_process_rows_per_s(folder: Path, *, rows: int, batches: int, shape: tuple[int, ...],
                          threads: int = 1) -> float:
    """Rows/s of the served model called in this process, ``rows`` per call, with ``threads`` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _in_process(folder, rows=rows, batches=batches, shape=shape)
    finally:
        torch.set_num_threads(before)


def _in_process(folder: Path, *, rows: int, batches: int, shape: tuple[int, ...]) -> float:
    from misleader.serving.model import ServedModel

    m = ServedModel(folder, output="probs", device="cpu")
    rng = np.random.default_rng(0)
    xs = [torch.from_numpy(rng.random((rows, *shape), dtype=np.float32)) for _ in range(8)]
    m.predict(xs[0])
    t0 = time.perf_counter()
    for i in range(batches):
        m.predict(xs[i % len(xs)])
    return rows * batches / (time.perf_counter() - t0)


def profile_request(folder: Path, *, rows: int = 64, repeats: int = 200) -> dict:
    """CPU milliseconds (``time.process_time``, robust to other processes' load) of the pieces of one
    ``rows``-row request, in process: body parsing (.npy, JSON), the batch check, sha256, the store's
    reserve + commit (with the log row), response encoding; then the model alone, the gateway's whole
    request handler, and the whole ASGI app (FastAPI/Starlette and the threadpool hop, no sockets)."""
    import json as _json

    from misleader.pow import puzzle
    from misleader.serving import schemas
    from misleader.serving.app import create_app
    from misleader.serving.keys import authenticate, create_key
    from misleader.serving.model import ServedModel
    from misleader.serving.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="bench_gateway_prof_"))
    store = Store(tmp / "p.sqlite3")
    key, rec = create_key(store, name="p", budget=None)
    model = ServedModel(folder, output="probs", device="cpu")
    app = create_app(folder=str(folder), store=store, model=model)
    gw = app.state.gateway
    shape = model.input_shape
    x = np.random.default_rng(0).random((rows, *shape), dtype=np.float32)
    xt = torch.from_numpy(x)
    body, jbody = npy(x), _json.dumps({"inputs": x.tolist()}).encode()
    out = model.predict(xt).numpy()

    def cpu(f, n: int = repeats) -> float:
        f()
        c0 = time.process_time()
        for _ in range(n):
            f()
        return 1000 * (time.process_time() - c0) / n

    def reserve_commit() -> None:
        rid = store.reserve(rec.id, rows)
        store.commit(rid, log_row={"key_id": rec.id, "status": 200, "batch_sha256": "0" * 64})

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
             "headers": [(b"authorization", f"Bearer {key}".encode()), (b"content-type", schemas.NPY.encode()),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}

    async def asgi(n: int) -> None:
        for _ in range(n):
            msgs = [{"type": "http.request", "body": body, "more_body": False}]
            sent: list = []

            async def receive() -> dict:
                return msgs.pop() if msgs else {"type": "http.disconnect"}

            async def send(m: dict) -> None:
                sent.append(m)

            await app(scope, receive, send)
            assert sent[0]["status"] == 200, sent

    loop = asyncio.new_event_loop()
    loop.run_until_complete(asgi(5))
    c0 = time.process_time()
    loop.run_until_complete(asgi(repeats))
    asgi_ms = 1000 * (time.process_time() - c0) / repeats
    loop.close()
    res = {"rows": rows, "load_before": os.getloadavg(), "cpu_ms": {
        "parse_npy": cpu(lambda: schemas.parse_npy_batch(body)),
        "parse_json": cpu(lambda: schemas.parse_json_batch(jbody), max(1, repeats // 10)),
        "batch_check": cpu(lambda: gw.parse(body, schemas.NPY, rec.id)) - cpu(lambda: schemas.parse_npy_batch(body)),
        "oracle_validate": cpu(lambda: model.validate(xt)),
        "sha256": cpu(lambda: puzzle.batch_digest(xt)),
        "authenticate": cpu(lambda: authenticate(store, key)),
        "reserve_commit_log": cpu(reserve_commit),
        "encode_npy": cpu(lambda: schemas.npy_bytes(out)),
        "encode_json": cpu(lambda: _json.dumps({"outputs": out.tolist()}), max(1, repeats // 4)),
        "model_predict": cpu(lambda: model.predict(xt)),
        "gateway_handler": cpu(lambda: gw.predict(token=key, body=body, content_type=schemas.NPY, headers={})),
        "asgi_app": asgi_ms}}
    res["load_after"] = os.getloadavg()
    store.close()
    return res


class _Skip(Exception):
    """--kill-only: skip the accounting and throughput phases."""


def bench_store(folder: Path, db: str, args: argparse.Namespace, shape: tuple[int, ...]) -> dict:
    out: dict = {}
    total = args.requests if args.requests_per_client is None else args.requests_per_client * args.clients
    per_key_requests = total // args.keys
    budget = int(per_key_requests * 0.9)  # the last tenth of each key's requests must be refused
    proc, url = start_server(folder, db) if not args.kill_only else (None, "")
    try:
        if proc is None:
            raise _Skip
        if not args.skip_accounting:
            keys = make_keys(db, args.keys, budget, "acct")
            load0 = os.getloadavg()
            res = asyncio.run(load(url, list(keys), clients=args.clients, requests=total, rows=1, shape=shape,
                                   per_client=args.requests_per_client, http_client=args.http_client))
            out["accounting"] = {**{k: v for k, v in res.items() if k != "answered"}, "budget_per_key": budget,
                                 "requests": total, "requests_per_client": args.requests_per_client,
                                 "load_before": load0, "store": check_store(db, keys, res["answered"])}
        tkeys = make_keys(db, 1, None, "thru")
        n_req = max(1, args.throughput_requests)
        tclients = args.throughput_clients or args.clients
        # the in-process oracle on the same batches, before and after the HTTP phase (same process, same run)
        local_before = in_process_rows_per_s(folder, rows=64, batches=n_req, shape=shape)
        load0 = os.getloadavg()
        res64 = asyncio.run(load(url, list(tkeys), clients=tclients, requests=n_req, rows=64, shape=shape,
                                 http_client=args.http_client))
        local_after = in_process_rows_per_s(folder, rows=64, batches=n_req, shape=shape)
        local = (local_before + local_after) / 2
        # the same with every core's torch threads: the baseline for a server of several processes (--workers)
        local_all = in_process_rows_per_s(folder, rows=64, batches=n_req, shape=shape, threads=os.cpu_count() or 1)
        out["throughput_64"] = {"clients": tclients, "requests": n_req, "http_client": args.http_client,
                                "http_rows_per_s": res64["rows_per_s"], "in_process_rows_per_s": local,
                                "in_process_before_after": [local_before, local_after],
                                "ratio": res64["rows_per_s"] / local, "p50_ms": res64["p50_ms"],
                                "in_process_rows_per_s_all_threads": local_all,
                                "ratio_to_all_threads": res64["rows_per_s"] / local_all,
                                "p99_ms": res64["p99_ms"], "statuses": res64["statuses"], "errors": res64["errors"],
                                "load_before": load0, "load_after": res64["load_after"]}
    except _Skip:
        pass
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(120)
    if args.kill:
        kkeys = make_keys(db, args.keys, int(per_key_requests * 0.9), "kill")
        proc, url = start_server(folder, db, "--reservation-timeout", "2")
        loop_task = asyncio.new_event_loop()

        async def run_and_kill() -> dict:
            task = asyncio.create_task(load(url, list(kkeys), clients=args.clients, requests=total, rows=1,
                                            shape=shape, stop_after=60, http_client=args.http_client))
            await asyncio.sleep(args.kill_after)
            os.kill(proc.pid, signal.SIGKILL)
            return await task

        res = loop_task.run_until_complete(run_and_kill())
        loop_task.close()
        proc.wait()
        before = check_store(db, kkeys, None)
        proc, url = start_server(folder, db, "--reservation-timeout", "2")
        time.sleep(2.5)
        from misleader.serving.store import Store

        s = Store(db)
        s.expire_reservations()
        s.close()
        after = check_store(db, kkeys, None)
        proc.terminate()
        proc.wait(30)
        out["kill"] = {"answered_to_clients": sum(res["answered"].values()),
                       "store_used": sum(k["used"] for k in after["keys"].values()),
                       "pending_at_kill": before["pending_reservations"], "after_restart": after}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help="victim or defense folder (default: a tiny digits victim)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=10000,
                    help="single-row requests in all in the accounting phase (shared by the clients)")
    ap.add_argument("--requests-per-client", type=int, default=None,
                    help="instead of --requests: each client sends this many (32 x 10,000: --requests-per-client "
                         "10000)")
    ap.add_argument("--skip-accounting", action="store_true", help="only the throughput (and kill) phases")
    ap.add_argument("--throughput-requests", type=int, default=500, help="64-row requests in the throughput phase")
    ap.add_argument("--throughput-clients", type=int, default=None,
                    help="concurrent clients in the throughput phase (default --clients)")
    ap.add_argument("--http-client", choices=["raw", "httpx"], default="raw",
                    help="load generator: raw asyncio HTTP/1.1 (little client CPU) or httpx.AsyncClient")
    ap.add_argument("--keys", type=int, default=8)
    ap.add_argument("--pg", default=os.environ.get("MISLEADER_TEST_PG"), help="PostgreSQL URL (a fresh schema)")
    ap.add_argument("--kill", action="store_true", help="also kill -9 the server mid-load and check the store")
    ap.add_argument("--kill-after", type=float, default=10.0, help="seconds of load before the kill -9")
    ap.add_argument("--kill-only", action="store_true", help="only the kill phase")
    ap.add_argument("--profile", action="store_true",
                    help="only the in-process CPU profile of one 64-row request (see profile_request)")
    ap.add_argument("--ray-replicas", type=int, default=None, metavar="N",
                    help="serve under Ray Serve with N replicas sharing the PostgreSQL store (needs --pg; the "
                         "SQLite and kill phases are skipped)")
    ap.add_argument("--stores", choices=["all", "sqlite", "postgresql"], default="all",
                    help="which stores to measure (postgresql needs --pg); 'all': SQLite, and PostgreSQL with --pg")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="extra `misleader serve` argument for every server started (repeatable), "
                         "e.g. --server-arg=--max-batch-rows --server-arg=0 to answer each request alone")
    ap.add_argument("--out", default="bench/results/gateway.json")
    args = ap.parse_args()
    SERVER_EXTRA[:] = list(args.server_arg)
    args.kill = args.kill or args.kill_only
    if args.stores == "postgresql" and not args.pg:
        raise SystemExit("--stores postgresql needs --pg URL (or $MISLEADER_TEST_PG)")
    torch.set_num_threads(1)

    tmp = Path(tempfile.mkdtemp(prefix="bench_gateway_"))
    if args.target is None:
        from misleader.training.victim import train_victim

        folder = tmp / "victim"
        train_victim(dataset="digits", arch="lenet5_fifth", epochs=1, out=folder, device="cpu", seed=0)
    else:
        folder = Path(args.target)
    from misleader.oracle.manifest import read_target

    shape = tuple(read_target(folder).input_shape)
    if args.profile:
        result = {"target": str(folder), "command": " ".join(sys.argv), "cpus": os.cpu_count(),
                  "profile_64": profile_request(folder)}
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            from misleader.utils import atomic_write_text

            atomic_write_text(args.out, text + "\n")
        return
    result = {"target": str(folder), "clients": args.clients, "requests": args.requests,
              "requests_per_client": args.requests_per_client, "keys": args.keys, "http_client": args.http_client,
              "command": " ".join(sys.argv), "load_before": os.getloadavg(), "cpus": os.cpu_count(),
              "server_args": list(args.server_arg), "stores": {}}
    if args.ray_replicas:
        global START_WAIT_S
        if not args.pg:
            raise SystemExit("--ray-replicas needs --pg URL (the replicas share a PostgreSQL store)")
        SERVER_EXTRA[:] = [*args.server_arg, "--ray", "--replicas", str(args.ray_replicas), "--replica-cpus", "0.5"]
        START_WAIT_S = 600.0
        args.kill = args.kill_only = False
        result["ray_replicas"] = args.ray_replicas
    elif args.stores in ("all", "sqlite"):
        result["stores"]["sqlite"] = bench_store(folder, str(tmp / "g.sqlite3"), args, shape)
    if args.pg and args.stores in ("all", "postgresql"):
        import psycopg

        schema = "bench_" + secrets.token_hex(4)
        with psycopg.connect(args.pg, autocommit=True) as c:
            c.execute(f"CREATE SCHEMA {schema}")
        sep = "&" if "?" in args.pg else "?"
        result["stores"]["postgresql"] = bench_store(folder, f"{args.pg}{sep}options=-csearch_path%3D{schema}",
                                                     args, shape)
    result["load_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from misleader.utils import atomic_write_text

        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
