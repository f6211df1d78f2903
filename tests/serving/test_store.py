"""The store: keys as hashes, exact reservations under concurrency, release, expiry, replay, log."""

from __future__ import annotations

import threading
import time

import pytest

from misleader.errors import MisleaderError
from misleader.serving.keys import authenticate, create_key, hash_key
from misleader.serving.store import BudgetExceeded, Store


def test_key_is_stored_as_hash_only(store):
    key, rec = create_key(store, name="alice", budget=10, rate="5/second")
    assert authenticate(store, key).id == rec.id
    assert authenticate(store, key + "x") is None and authenticate(store, "") is None
    dump = repr(store._query("SELECT * FROM api_keys"))
    assert key not in dump and hash_key(key) in dump
    with pytest.raises(MisleaderError, match="exists"):
        create_key(store, name="alice", budget=1)
    assert store.revoke("alice").revoked and store.set_budget("alice", 3).budget == 3
    with pytest.raises(MisleaderError, match="not understood"):
        create_key(store, name="bob", budget=1, rate="lots")


def test_reserve_commit_release_exact(store):
    _, k = create_key(store, name="a", budget=10)
    r1 = store.reserve(k.id, 6)
    with pytest.raises(BudgetExceeded) as info:
        store.reserve(k.id, 5)
    assert info.value.remaining == 4
    store.release(r1)                      # the model failed: rows come back
    assert store.get_key("a").remaining == 10
    r2 = store.reserve(k.id, 10)
    assert store.commit(r2, log_row={"key_id": k.id, "status": 200, "batch_sha256": "ab"})
    k2 = store.get_key("a")
    assert (k2.used, k2.reserved, k2.remaining) == (10, 0, 0)
    assert store.logged_rows(k.id) == 10 and store.last_queries(1)[0]["rows_n"] == 10
    with pytest.raises(BudgetExceeded):
        store.reserve(k.id, 1)
    store.revoke("a")
    store.set_budget("a", 100)
    with pytest.raises(BudgetExceeded):   # revoked keys reserve nothing
        store.reserve(k.id, 1)


def test_concurrent_reservations_never_exceed_budget(store):
    _, k = create_key(store, name="c", budget=50)
    got, refused = [], []

    def worker() -> None:
        for _ in range(10):
            try:
                rid = store.reserve(k.id, 3)
            except BudgetExceeded:
                refused.append(1)
                continue
            assert store.commit(rid, log_row={"key_id": k.id, "status": 200})
            got.append(3)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec = store.get_key("c")
    assert sum(got) == rec.used == store.logged_rows(k.id) == 48   # 16 batches of 3 fit in 50
    assert rec.reserved == 0 and store.pending_reservations() == 0 and len(refused) == 60 - 16


def test_dangling_reservation_expires_and_restart_keeps_state(db_url):
    s = Store(db_url)
    _, k = create_key(s, name="d", budget=5)
    s.reserve(k.id, 4, timeout=0.05)         # a server killed before commit/release
    assert s.get_key("d").remaining == 1
    s.close()
    time.sleep(0.1)
    s2 = Store(db_url)                         # restart: the expired reservation is released
    rec = s2.get_key("d")
    assert (rec.used, rec.reserved, rec.budget) == (0, 0, 5) and s2.pending_reservations() == 0
    rid = s2.reserve(k.id, 5, timeout=0.01)
    time.sleep(0.05)
    s2.expire_reservations()
    assert not s2.commit(rid, log_row={"key_id": k.id, "status": 200})   # too late: not counted
    assert s2.get_key("d").used == 0
    s2.close()


def test_spent_store_refuses_replay(store):
    now = time.time()
    assert store.spend("c1", expires=now + 10, now=now)
    assert not store.spend("c1", expires=now + 10, now=now)
    assert store.spend("c1", expires=now + 30, now=now + 20)   # pruned after expiry


def test_newer_schema_refused(tmp_path):
    url = str(tmp_path / "g.sqlite3")
    s = Store(url)
    with s._tx() as cur:
        cur.execute("UPDATE meta SET v = '99' WHERE k = 'schema_version'")
    s.close()
    with pytest.raises(MisleaderError, match="newer"):
        Store(url)
