"""Gateway fixtures: a store on SQLite and (when ``MISLEADER_TEST_PG`` is set) on PostgreSQL."""

from __future__ import annotations

import os
import secrets

import pytest

pytest.importorskip("fastapi", reason="the gateway needs the serve extra: pip install 'misleader[serve]'")

PG = os.environ.get("MISLEADER_TEST_PG")


def pg_url() -> str:
    """A fresh schema on the test PostgreSQL server (search_path in the URL), so tests never share tables."""
    import psycopg

    schema = "t_" + secrets.token_hex(6)
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG else "?"
    return f"{PG}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A store URL on each engine (PostgreSQL skipped without MISLEADER_TEST_PG)."""
    if request.param == "sqlite":
        return str(tmp_path / "gateway.sqlite3")
    if not PG:
        pytest.skip("set MISLEADER_TEST_PG=postgresql://... to test the PostgreSQL store (.ci/run does)")
    return pg_url()


@pytest.fixture
def store(db_url):
    from misleader.serving.store import Store

    s = Store(db_url)
    yield s
    s.close()


@pytest.fixture(scope="session")
def served_model(tiny_victim):
    """The tiny victim opened once as the gateway serves it."""
    from misleader.serving.model import ServedModel

    return ServedModel(tiny_victim, output="probs", device="cpu")


@pytest.fixture
def make_client(tiny_victim, served_model, tmp_path):
    """``make_client(**config) -> (TestClient, store)`` over the tiny victim and a fresh SQLite store."""
    from fastapi.testclient import TestClient

    from misleader.serving.app import GatewayConfig, create_app
    from misleader.serving.store import Store

    made = []

    def make(store=None, **cfg):
        store = store or Store(tmp_path / f"g{len(made)}.sqlite3")
        client = TestClient(create_app(folder=str(tiny_victim), store=store, config=GatewayConfig(**cfg),
                                       model=served_model))
        made.append((client, store))
        return client, store

    yield make
    for client, store in made:
        client.close()
        store.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``misleader serve`` in a subprocess on a loopback port (a real uvicorn)."""

    def __init__(self, folder, db: str, *extra: str) -> None:
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = db
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        self.proc = subprocess.Popen([sys.executable, "-m", "misleader", "-q", "serve", str(folder), "--port",
                                      str(self.port), "--db", db, "--device", "cpu", *extra], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        import time

        import httpx

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def live(tiny_victim, tmp_path_factory):
    """``live(*extra_args, db=None) -> LiveServer`` (stopped after the module)."""
    tmp_path = tmp_path_factory.mktemp("live")
    servers = []

    def start(*extra: str, db: str | None = None) -> LiveServer:
        s = LiveServer(tiny_victim, db or str(tmp_path / "live.sqlite3"), *extra)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()
