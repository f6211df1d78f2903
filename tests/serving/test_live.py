"""A real uvicorn on a loopback port: the HTTP oracle, `misleader query`, a Knockoff through the server, PoW."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import misleader
from misleader.errors import QueryBudgetExceeded
from misleader.serving.keys import create_key
from misleader.serving.store import Store


@pytest.fixture(scope="module")
def plain(live, tmp_path_factory):
    """One server without PoW for the module; tests use their own key names."""
    db = str(tmp_path_factory.mktemp("plain") / "g.sqlite3")
    return live(db=db)


def _keys(db: str, **budgets: int | None) -> dict[str, str]:
    s = Store(db)
    try:
        return {name: create_key(s, name=name, budget=b)[0] for name, b in budgets.items()}
    finally:
        s.close()


def test_connect_oracle_budget_and_query_cli(plain, tmp_path, served_model, capsys):
    srv, db = plain, plain.db
    keys = _keys(db, a=7)
    oracle = misleader.connect(srv.url, api_key=keys["a"])
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(oracle.query(x), served_model.predict(x))
    assert oracle.usage()["remaining"] == 3 and oracle.queries_used == 4
    with pytest.raises(QueryBudgetExceeded, match="3"):
        oracle.query(x)
    assert oracle.queries_used == 4          # refused: nothing counted locally either
    with pytest.raises(ValueError, match="shape"):
        oracle.query(torch.rand(2, 3, 32, 32))
    oracle.close()

    np.save(tmp_path / "b.npy", x[:2].numpy())
    from misleader.cli import main

    assert main(["query", srv.url, "--api-key", keys["a"], "--input", str(tmp_path / "b.npy")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 2 and out["remaining"] == 1 and len(out["labels"]) == 2
    assert main(["query", srv.url, "--api-key", "msk_wrong", "--input", str(tmp_path / "b.npy")]) == 2
    assert "unknown API key" in capsys.readouterr().err


def test_knockoff_through_server_equals_in_process_and_stops_at_key_budget(plain, tmp_path, tiny_victim):
    from misleader.attacks.harness import run_attack

    torch.set_num_threads(1)
    srv, db = plain, plain.db
    keys = _keys(db, attacker=60, short=40, referee=None)
    kw = dict(budget=60, clone_arch="lenet5_fifth", device="cpu", seed=3, options={"epochs": 1, "query_batch": 32})
    local = run_attack("knockoff", target=tiny_victim, out=tmp_path / "local", **kw)
    remote = run_attack("knockoff", target=srv.url, out=tmp_path / "remote", api_key=keys["attacker"],
                        referee_key=keys["referee"], **kw)
    assert (tmp_path / "local" / "clone.safetensors").read_bytes() == (tmp_path / "remote" / "clone.safetensors"
                                                                       ).read_bytes()
    assert remote["clone_accuracy"] == local["clone_accuracy"] and remote["fidelity"] == local["fidelity"]
    assert remote["queries_used"] == 60 and remote["pow_seconds"] == 0
    with pytest.raises(QueryBudgetExceeded):   # the key allows 40 of the attack's 60
        run_attack("knockoff", target=srv.url, out=tmp_path / "short", api_key=keys["short"],
                   referee_key=keys["referee"], **kw)
    s = Store(db)
    k = s.get_key("short")
    assert (k.used, k.reserved) == (32, 0) and s.logged_rows(k.id) == 32   # whole batches of 32: 40 allows one
    assert s.get_key("attacker").used == 60
    s.close()


def test_http_oracle_solves_pow(make_client, served_model):
    """The client's 428 handling, through the in-process app (the live server is tested above)."""
    from misleader.serving.client import HttpOracle
    from misleader.serving.policy import FixedBits

    client, store = make_client(pow=FixedBits(8))
    key, _ = create_key(store, name="a", budget=10)
    oracle = HttpOracle("http://testserver", api_key=key, http=client)
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(oracle.query(x), served_model.predict(x))
    assert oracle.pow_bits == 8 and oracle.pow_seconds > 0 and oracle.usage()["used"] == 3
    assert [q["status"] for q in store.last_queries(2)] == [200, 428]
    with pytest.raises(QueryBudgetExceeded):
        oracle.query(torch.rand(8, 1, 32, 32))
    assert oracle.pow_bits == 8        # refused before any puzzle was issued


def test_two_worker_processes_share_budgets_and_pow_secret(live, tmp_path, served_model):
    """``--workers 2``: every request on a new connection (so the kernel spreads them, and a PoW challenge and
    its resent batch often reach different workers); the store keeps the budget exact across the processes,
    and every challenge is accepted (one secret for both workers)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from misleader.serving.client import HttpOracle

    db = str(tmp_path / "w.sqlite3")
    srv = live("--workers", "2", "--pow-bits", "4", db=db)
    keys = _keys(db, a=50)
    x = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(4))

    def client(_: int) -> tuple[int, int]:
        fresh = httpx.Client(base_url=srv.url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0))
        oracle = HttpOracle(srv.url, api_key=keys["a"], http=fresh)
        ok = refused = 0
        for _ in range(4):
            try:
                out = oracle.query(x)
                assert torch.allclose(out, served_model.predict(x), atol=1e-6)
                ok += 1
            except QueryBudgetExceeded:
                refused += 1
        oracle.close()
        return ok, refused

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(client, range(6)))
    answered = sum(ok for ok, _ in results)
    assert answered == 10 and sum(r for _, r in results) == 14   # 50 rows = 10 batches of 5, exactly
    s = Store(db)
    k = s.get_key("a")
    assert (k.used, k.reserved) == (50, 0) and s.logged_rows(k.id) == 50
    assert [q["status"] for q in s.last_queries(100)].count(428) >= 10   # each answered batch paid a puzzle
    s.close()
