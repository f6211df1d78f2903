"""The detector policies of the gateway (log, gate, refuse): per-row decisions, exact budgets, per-key statistics.

A stub scorer (the mean pixel of a row, threshold 0.5) makes the flagged rows known in advance; the CLI
test serves a real tiny SAME detector folder.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from misleader.serving.keys import create_key
from misleader.serving.policy import DetectorPolicy


class MeanScorer:
    """Test stub of the detector interface: score = mean pixel of the row; flagged above 0.5."""

    threshold = 0.5

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _rows(levels: list[float], seed: int = 0) -> torch.Tensor:
    """One row per level: uniform noise of width 0.2 around ``level`` (mean pixel ~ level)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor(levels).view(-1, 1, 1, 1)
    return (base + 0.2 * (torch.rand(len(levels), 1, 32, 32, generator=g) - 0.5)).clamp(0, 1)


def _npy(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x.numpy())
    return buf.getvalue()


LEVELS = [0.2, 0.8, 0.3, 0.9, 0.1]  # rows 1 and 3 flagged
FLAGGED = torch.tensor([False, True, False, True, False])


@pytest.fixture(scope="module")
def gate_folder(tiny_victim, tmp_path_factory):
    """A defense folder on the tiny victim whose answers differ from it: probabilities rounded to 1 decimal."""
    from misleader.defenses.postprocess import build_post

    out = tmp_path_factory.mktemp("gate") / "round"
    build_post(victim=tiny_victim, out=out, op="round", decimals=1)
    return out


def test_log_policy_answers_everything_and_keeps_per_key_statistics(make_client, served_model):
    det = DetectorPolicy(scorer=MeanScorer(), policy="log", flag_fraction=0.3, flag_min_rows=8)
    client, store = make_client(detector=det)
    key, rec = create_key(store, name="a", budget=100)
    other, orec = create_key(store, name="b", budget=100)
    x = _rows(LEVELS)
    r = client.post("/v1/predict", json={"inputs": x.tolist()}, headers=_auth(key))
    body = r.json()
    assert r.status_code == 200 and body["rows"] == 5 and body["refused"] is None and "flagged" not in body
    assert torch.equal(torch.tensor(body["outputs"]), served_model.predict(x))
    q = store.last_queries(1)[0]
    assert q["flagged_rows"] == 2
    assert q["detector_score"] == pytest.approx(float(MeanScorer().score(x).mean()), abs=1e-6)
    st = store.detector_stats()[rec.id]
    assert (st.queries, st.flagged) == (5, 2) and st.mean_score == pytest.approx(float(x.mean()), abs=1e-5)
    assert "misleader_flagged_clients 0" in client.get("/metrics").text  # 5 rows < flag_min_rows
    client.post("/v1/predict", content=_npy(_rows(LEVELS, 1)),
                headers={**_auth(key), "Content-Type": "application/x-npy"})
    client.post("/v1/predict", json={"inputs": _rows([0.1] * 8).tolist()}, headers=_auth(other))
    metrics = client.get("/metrics").text
    assert "misleader_flagged_clients 1" in metrics and rec.id not in metrics  # which key: status page only
    assert "misleader_detector_rows_flagged_total 4" in metrics
    assert store.get_key("a").used == 10 == store.logged_rows(rec.id) and store.get_key("b").used == 8
    # the statistics and the flag survive a restart (a new app on the same store)
    client2, _ = make_client(store=store, detector=DetectorPolicy(scorer=MeanScorer(), flag_fraction=0.3,
                                                                  flag_min_rows=8))
    assert "misleader_flagged_clients 1" in client2.get("/metrics").text
    admin, _ = create_key(store, name="root", budget=None, admin=True)
    page = client2.get("/", headers=_auth(admin)).text
    assert "policy log" in page and "4 (40.0%)" in page and "flagged</td>" in page


def test_gate_policy_answers_flagged_rows_from_the_gate_folder(make_client, served_model, gate_folder):
    from misleader.serving.model import ServedModel

    gate = ServedModel(gate_folder, output="probs")
    client, store = make_client(detector=DetectorPolicy(scorer=MeanScorer(), policy="gate", gate=gate))
    key, rec = create_key(store, name="a", budget=100)
    x = _rows(LEVELS)
    r = client.post("/v1/predict", content=_npy(x), headers={**_auth(key), "Content-Type": "application/x-npy"})
    assert r.status_code == 200 and not any(h.startswith(("x-flag", "x-refus")) for h in r.headers)  # covert
    assert store.last_queries(1)[0]["flagged_rows"] == 2
    out = torch.from_numpy(np.load(io.BytesIO(r.content), allow_pickle=False))
    assert torch.equal(out[~FLAGGED], served_model.predict(x[~FLAGGED]))
    assert torch.equal(out[FLAGGED], gate.predict(x[FLAGGED]))
    assert not torch.equal(out[FLAGGED], served_model.predict(x[FLAGGED]))  # the gate really answers differently
    assert store.get_key("a").used == 5 == store.logged_rows(rec.id)  # gated rows are answered, so counted


def test_refuse_policy_refuses_flagged_rows_and_does_not_count_them(make_client, served_model):
    from misleader.serving.client import HttpOracle

    client, store = make_client(detector=DetectorPolicy(scorer=MeanScorer(), policy="refuse"))
    key, rec = create_key(store, name="a", budget=8)
    x = _rows(LEVELS)
    # the server runs the model on the answered rows only (a 3-row batch: its float rounding can differ from a
    # 5-row batch's on some CPUs, so the expectation is the same 3-row forward)
    want = served_model.predict(x[~FLAGGED])
    r = client.post("/v1/predict", json={"inputs": x.tolist()}, headers=_auth(key))
    body = r.json()
    assert r.status_code == 200 and body["rows"] == 3 and body["refused"] == [1, 3] and body["remaining"] == 5
    assert body["outputs"][1] is None and body["outputs"][3] is None
    assert torch.equal(torch.tensor([body["outputs"][i] for i in (0, 2, 4)]), want)
    r = client.post("/v1/predict", content=_npy(x), headers={**_auth(key), "Content-Type": "application/x-npy"})
    out = torch.from_numpy(np.load(io.BytesIO(r.content), allow_pickle=False))
    assert r.headers["X-Refused-Rows"] == "2" and r.headers["X-Rows"] == "3"
    assert out[FLAGGED].isnan().all() and torch.equal(out[~FLAGGED], want)
    # 6 rows answered of a budget of 8: a 5-row batch is refused whole (its flagged rows would not count,
    # but the reservation is for every row sent)
    assert store.get_key("a").used == 6 == store.logged_rows(rec.id) and store.get_key("a").reserved == 0
    r = client.post("/v1/predict", json={"inputs": x.tolist()}, headers=_auth(key))
    assert r.status_code == 429 and r.json()["remaining"] == 2
    # a batch of flagged rows only: answered with nothing, counted nothing
    r = client.post("/v1/predict", json={"inputs": _rows([0.9, 0.8]).tolist()}, headers=_auth(key))
    assert r.status_code == 200 and r.json()["rows"] == 0 and r.json()["outputs"] == [None, None]
    assert store.get_key("a").used == 6 and store.pending_reservations() == 0
    q = store.last_queries(1)[0]
    assert (q["status"], q["rows_n"], q["flagged_rows"], q["reason"]) == (200, 0, 2, "refused 2 rows")
    assert "misleader_detector_rows_refused_total 6" in client.get("/metrics").text
    # the HTTP oracle answers refused rows as same-gate --refuse does in process: the uniform row
    oracle = HttpOracle("http://testserver", api_key=key, http=client)
    got = oracle.query(x[:2])
    assert torch.allclose(got[0], want[0], atol=1e-6) and torch.equal(got[1], torch.full((10,), 0.1))
    assert oracle.refused_rows == 1 and store.get_key("a").used == 7


def test_labels_refused_rows_are_minus_one(make_client, tiny_victim):
    from misleader.serving.model import ServedModel

    labels = ServedModel(tiny_victim, output="labels")
    client, store = make_client(detector=DetectorPolicy(scorer=MeanScorer(), policy="refuse"), output="labels")
    client.app.state.gateway.model = labels
    key, _ = create_key(store, name="a", budget=10)
    x = _rows(LEVELS)
    r = client.post("/v1/predict", content=_npy(x), headers={**_auth(key), "Content-Type": "application/x-npy"})
    out = torch.from_numpy(np.load(io.BytesIO(r.content), allow_pickle=False))
    assert out.dtype == torch.int64 and (out[FLAGGED] == -1).all()
    assert torch.equal(out[~FLAGGED], labels.predict(x[~FLAGGED]))


def test_policy_checks():
    from misleader.errors import MisleaderError

    with pytest.raises(MisleaderError, match="gate folder"):
        DetectorPolicy(scorer=MeanScorer(), policy="gate")
    with pytest.raises(MisleaderError, match="unknown detector policy"):
        DetectorPolicy(scorer=MeanScorer(), policy="block")

    class Uncalibrated(MeanScorer):
        threshold = None

    with pytest.raises(MisleaderError, match="threshold"):
        DetectorPolicy(scorer=Uncalibrated())


@pytest.fixture(scope="module")
def same_detector(tiny_victim, tmp_path_factory):
    from misleader.detect.same import train_same

    out = tmp_path_factory.mktemp("same") / "det"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_same(victim=tiny_victim, out=out, device="cpu", preset="tiny", limit=200)
    finally:
        torch.set_num_threads(n)
    return out


def test_serve_cli_with_a_same_detector(tiny_victim, same_detector, gate_folder, tmp_path, one_thread):
    """`misleader serve --detector S --policy gate --gate-folder X`: the SAME scores are logged, rows gated."""
    from fastapi.testclient import TestClient

    from misleader.cli import build_parser
    from misleader.commands.serve import build
    from misleader.detect.same import load_detector
    from misleader.errors import MisleaderError
    from misleader.serving.model import ServedModel

    db = str(tmp_path / "s.sqlite3")
    args = build_parser().parse_args(["serve", str(tiny_victim), "--db", db, "--detector", str(same_detector),
                                      "--policy", "gate", "--gate-folder", str(gate_folder)])
    app, store, _ = build(args)
    det = app.state.gateway.config.detector
    x = _rows([0.1, 0.3, 0.5, 0.7, 0.9, 0.2])
    scores = load_detector(same_detector).score(x)
    det.threshold = float(scores.median())  # some rows on each side
    flagged = scores > det.threshold
    assert 0 < int(flagged.sum()) < len(x)
    key, rec = create_key(store, name="a", budget=100)
    with TestClient(app) as client:
        r = client.post("/v1/predict", content=_npy(x), headers={**_auth(key), "Content-Type": "application/x-npy"})
    assert r.status_code == 200 and store.last_queries(1)[0]["flagged_rows"] == int(flagged.sum())
    out = torch.from_numpy(np.load(io.BytesIO(r.content), allow_pickle=False))
    assert torch.equal(out[flagged], ServedModel(gate_folder).predict(x[flagged]))
    assert torch.equal(out[~flagged], ServedModel(tiny_victim).predict(x[~flagged]))
    assert store.last_queries(1)[0]["detector_score"] == pytest.approx(float(scores.double().mean()), rel=1e-5)
    store.close()
    # a detector of another victim is refused with a one-line message
    other = tmp_path / "other"
    import shutil

    shutil.copytree(same_detector, other)
    meta = json.loads((other / "detector.json").read_text())
    meta["victim"]["sha256"] = "0" * 64
    (other / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(MisleaderError, match="another victim"):
        build(build_parser().parse_args(["serve", str(tiny_victim), "--db", db, "--detector", str(other)]))


def test_store_counts_answered_rows_and_scores_on_each_engine(store):
    """commit(answered=, scores=) on SQLite and PostgreSQL: refused rows released, statistics summed."""
    k = store.add_key(name="a", key_hash="h", budget=10)
    rid = store.reserve(k.id, 6)
    done = store.commit(rid, answered=4, scores=(6, 1.5, 2), log_row={"key_id": k.id, "status": 200,
                                                                     "flagged_rows": 2})
    assert done == (4, 6)
    rid = store.reserve(k.id, 6)  # 6 of the 6 left: the refused rows came back
    assert store.commit(rid, scores=(6, 0.5, 0), log_row={"key_id": k.id, "status": 200}) == (6, 0)
    st = store.detector_stats()[k.id]
    assert (st.queries, st.flagged) == (12, 2) and st.score_sum == pytest.approx(2.0)
    assert store.logged_rows(k.id) == 10 == store.get_key("a").used and store.get_key("a").reserved == 0
    assert store.last_queries(2)[1]["flagged_rows"] == 2
    with pytest.raises(ValueError, match="answered rows"):
        store.commit(store.reserve(k.id, 0), answered=1, log_row={"key_id": k.id, "status": 200})


def test_store_v1_is_migrated_on_each_engine(db_url):
    from misleader.serving.store import SCHEMA_VERSION, Store

    s = Store(db_url)
    for sql in ("ALTER TABLE queries DROP COLUMN flagged_rows", "DROP TABLE detector_stats",
                "UPDATE meta SET v = '1' WHERE k = 'schema_version'"):
        with s._tx() as cur:
            cur.execute(sql)
    s.close()
    s = Store(db_url)
    try:
        assert s._query("SELECT v FROM meta WHERE k = 'schema_version'")[0][0] == str(SCHEMA_VERSION)
        s.log_query({"key_id": "k", "rows": 0, "status": 428, "flagged_rows": 3})
        assert s.last_queries(1)[0]["flagged_rows"] == 3 and s.detector_stats() == {}
    finally:
        s.close()


def test_store_connections_are_pooled_not_leaked_per_thread(db_url):
    """Many short-lived threads (the server's retired thread-pool workers) must not each keep a connection."""
    import threading

    from misleader.serving.store import Store

    s = Store(db_url)
    try:
        k = s.add_key(name="pool", key_hash="h" * 64, budget=10_000)
        threads = [threading.Thread(target=lambda: s.commit(s.reserve(k.id, 1), log_row={"key_id": k.id,
                                                                                          "status": 200}))
                   for _ in range(60)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s.get_key(k.id).used == 60
        assert s.open_connections() <= s.max_idle
        # a refused reservation is rolled back and its connection reused, not closed
        with pytest.raises(Exception, match="budget"):
            s.reserve(k.id, 20_000)
        assert 1 <= s.open_connections() <= s.max_idle
    finally:
        s.close()
    assert s.open_connections() == 0
