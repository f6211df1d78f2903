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
