"""The app in-process: auth, budgets, rate limits, caps, JSON and .npy, metrics, status page, PoW."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from misleader.pow import puzzle
from misleader.serving.keys import create_key


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def _npy(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x.numpy())
    return buf.getvalue()


def test_predict_json_and_npy_match_in_process(make_client, served_model):
    client, store = make_client()
    key, rec = create_key(store, name="a", budget=10)
    x = _batch(3)
    r = client.post("/v1/predict", json={"inputs": x.tolist()}, headers=_auth(key))
    assert r.status_code == 200, r.text
    body = r.json()
    want = served_model.predict(x)
    assert body["rows"] == 3 and body["remaining"] == 7
    assert torch.equal(torch.tensor(body["outputs"], dtype=torch.float32), want)
    r = client.post("/v1/predict", content=_npy(x), headers={**_auth(key), "Content-Type": "application/x-npy"})
    assert r.status_code == 200 and r.headers["X-Budget-Remaining"] == "4"
    assert torch.equal(torch.from_numpy(np.load(io.BytesIO(r.content), allow_pickle=False)), want)
    # 5 rows with 4 left: 429 with the remaining count, nothing answered or counted
    r = client.post("/v1/predict", json={"inputs": _batch(5).tolist()}, headers=_auth(key))
    assert r.status_code == 429 and r.json()["remaining"] == 4 and "outputs" not in r.json()
    assert store.get_key("a").used == 6 and store.logged_rows(rec.id) == 6
    statuses = [q["status"] for q in store.last_queries(10)]
    assert statuses == [429, 200, 200]


def test_auth_and_revocation(make_client):
    client, store = make_client()
    key, _ = create_key(store, name="a", budget=10)
    x = {"inputs": _batch(1).tolist()}
    assert client.post("/v1/predict", json=x).status_code == 401
    r = client.post("/v1/predict", json=x, headers=_auth("msk_nope"))
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    store.revoke("a")
    assert client.post("/v1/predict", json=x, headers=_auth(key)).json()["reason"] == "revoked"


def test_bad_bodies_and_caps(make_client):
    client, store = make_client(max_rows=4)
    key, rec = create_key(store, name="a", budget=100)
    h = _auth(key)
    cases = [
        (client.post("/v1/predict", content=b"{", headers={**h, "Content-Type": "application/json"}), 400),
        (client.post("/v1/predict", json={"x": 1}, headers=h), 400),
        (client.post("/v1/predict", json={"inputs": [[1, 2], [3]]}, headers=h), 400),
        (client.post("/v1/predict", json={"inputs": _batch(2).tolist()[0]}, headers=h), 422),
        (client.post("/v1/predict", json={"inputs": [[[[True] + [1] * 31] * 32]]}, headers=h), 400),
        (client.post("/v1/predict", json={"inputs": [[[[0.5] * 31 + [False]] * 32]]}, headers=h), 400),
        (client.post("/v1/predict", json={"inputs": [[[["0.5"] * 32] * 32]]}, headers=h), 400),
        (client.post("/v1/predict", content=b'{"inputs": [[[[NaN]]]]}', headers={**h, "Content-Type": "application/json"}),
         400),
        (client.post("/v1/predict", json={"inputs": (_batch(1) * 2).tolist()}, headers=h), 422),
        (client.post("/v1/predict", json={"inputs": _batch(5).tolist()}, headers=h), 413),
        (client.post("/v1/predict", content=b"\x93NUMPY junk", headers={**h, "Content-Type": "application/x-npy"}),
         400),
        (client.post("/v1/predict", content=b"x" * 10**6, headers=h), 413),
    ]
    for r, status in cases:
        assert r.status_code == status, r.text
        assert "Traceback" not in r.text and r.json()["detail"]
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    r = client.post("/v1/predict", content=obj.getvalue(), headers={**h, "Content-Type": "application/x-npy"})
    assert r.status_code == 400          # pickled arrays are never loaded
    assert store.get_key("a").used == 0


def test_rate_limit_retry_after(make_client):
    client, store = make_client()
    key, _ = create_key(store, name="a", budget=100, rate="2/minute")
    x = {"inputs": _batch(1).tolist()}
    codes = [client.post("/v1/predict", json=x, headers=_auth(key)).status_code for _ in range(2)]
    r = client.post("/v1/predict", json=x, headers=_auth(key))
    assert codes == [200, 200] and r.status_code == 429 and r.json()["reason"] == "rate"
    assert 1 <= int(r.headers["Retry-After"]) <= 60


def test_model_failure_releases_reservation(make_client, monkeypatch, served_model):
    client, store = make_client()
    key, rec = create_key(store, name="a", budget=10)

    def boom(x):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(served_model, "predict", boom)
    r = client.post("/v1/predict", json={"inputs": _batch(2).tolist()}, headers=_auth(key))
    assert r.status_code == 500 and "fire" not in r.text and "Traceback" not in r.text
    k = store.get_key("a")
    assert (k.used, k.reserved) == (0, 0) and store.last_queries(1)[0]["reason"] == "model_failed"


def test_model_usage_health_metrics_openapi(make_client):
    client, store = make_client()
    key, _ = create_key(store, name="a", budget=10)
    info = client.get("/v1/model").json()
    assert info["input_shape"] == [1, 32, 32] and info["num_classes"] == 10 and info["pipeline"]
    assert "sha256" not in str(info["pipeline"])  # pipeline summary: step describe() only, no file digests
    assert client.get("/healthz").json() == {"status": "ok"}
    client.post("/v1/predict", json={"inputs": _batch(2).tolist()}, headers=_auth(key))
    client.post("/v1/predict", json={"inputs": _batch(2).tolist()})
    assert client.get("/v1/usage", headers=_auth(key)).json() == {"name": "a", "budget": 10, "used": 2,
                                                                  "remaining": 8}
    m = client.get("/metrics").text
    assert "misleader_rows_total 2" in m and 'misleader_rejections_total{reason="no_key"} 1' in m
    assert 'misleader_request_seconds_count 2' in m
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/x-npy"}
    assert set(schema["paths"]) >= {"/v1/predict", "/v1/model", "/v1/usage", "/healthz", "/metrics", "/"}


def test_status_page_needs_admin(make_client):
    client, store = make_client()
    key, _ = create_key(store, name="user<b>", budget=10)
    admin, _ = create_key(store, name="ops", budget=0, admin=True)
    client.post("/v1/predict", json={"inputs": _batch(2).tolist()}, headers=_auth(key))
    assert client.get("/").status_code == 401
    assert client.get("/", headers=_auth(key)).status_code == 403
    r = client.get("/", headers=_auth(admin))
    assert r.status_code == 200 and "user&lt;b&gt;" in r.text and "<b>user" not in r.text


def test_pow_flow(make_client):
    from misleader.serving.policy import FixedBits

    client, store = make_client(pow=FixedBits(6))
    key, rec = create_key(store, name="a", budget=10)
    x = _batch(2)
    r = client.post("/v1/predict", json={"inputs": x.tolist()}, headers=_auth(key))
    assert r.status_code == 428 and r.json()["bits"] == 6 and store.get_key("a").used == 0
    token = r.json()["challenge"]
    assert puzzle.parse_challenge(token)["batch"] == puzzle.batch_digest(x)
    nonce = puzzle.solve(token)
    pow_h = {**_auth(key), "X-PoW-Challenge": token, "X-PoW-Nonce": str(nonce)}
    # another batch with this solution: refused; the right batch: answered once; a replay: refused
    assert client.post("/v1/predict", json={"inputs": _batch(2, 1).tolist()}, headers=pow_h).status_code == 400
    r = client.post("/v1/predict", json={"inputs": x.tolist()}, headers=pow_h)
    assert r.status_code == 200 and r.json()["pow_bits"] == 6
    r = client.post("/v1/predict", json={"inputs": x.tolist()}, headers=pow_h)
    assert r.status_code == 400 and "already used" in r.json()["detail"]
    other, _ = create_key(store, name="b", budget=10)
    r = client.post("/v1/predict", json={"inputs": x.tolist()}, headers={**pow_h, **_auth(other)})
    assert r.status_code == 400 and "another client" in r.json()["detail"]
    assert store.get_key("a").used == 2
    assert "misleader_pow_bits_issued_total 6" in client.get("/metrics").text
    # a batch over the remaining budget is refused before any puzzle is issued
    r = client.post("/v1/predict", json={"inputs": _batch(9).tolist()}, headers=_auth(key))
    assert r.status_code == 429 and r.json()["remaining"] == 8
