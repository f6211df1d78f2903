"""The PoW puzzle: every rejection, one-hash verification, the bits cap, the store's pruning."""

from __future__ import annotations

import hashlib

import pytest
import torch

from misleader.pow import puzzle as pz

SECRET = b"0123456789abcdef-test-secret"
BATCH = hashlib.sha256(b"batch").hexdigest()


def _issue(bits: int = 6, ttl: float = 60.0, now: float = 1000.0, client: str = "alice") -> str:
    return pz.issue_challenge(secret=SECRET, client=client, batch_sha256=BATCH, bits=bits, ttl=ttl, now=now)


def _verify(token: str, nonce: int, store, *, client: str = "alice", batch: str = BATCH, now: float = 1001.0,
            secret: bytes = SECRET) -> dict:
    return pz.verify(token, solution=nonce, secret=secret, client=client, batch_sha256=batch, store=store, now=now)


def test_solved_challenge_verifies_with_one_hash(monkeypatch) -> None:
    token = _issue(bits=8)
    nonce = pz.solve(token)
    assert pz.leading_zero_bits(hashlib.sha256(f"{token}:{nonce}".encode()).digest()) >= 8
    calls = []
    real = pz._digest
    monkeypatch.setattr(pz, "_digest", lambda t, n: calls.append(n) or real(t, n))
    payload = _verify(token, nonce, pz.MemorySpentStore())
    assert payload["bits"] == 8 and payload["client"] == "alice" and calls == [nonce]


def test_replayed_challenge_is_rejected() -> None:
    store = pz.MemorySpentStore()
    token = _issue()
    nonce = pz.solve(token)
    _verify(token, nonce, store)
    with pytest.raises(pz.ChallengeReplayed):
        _verify(token, nonce, store)


def test_expired_challenge_is_rejected() -> None:
    token = _issue(ttl=5.0, now=1000.0)
    with pytest.raises(pz.ChallengeExpired):
        _verify(token, pz.solve(token), pz.MemorySpentStore(), now=1005.5)


def test_altered_batch_is_rejected() -> None:
    token = _issue()
    other = hashlib.sha256(b"another batch").hexdigest()
    with pytest.raises(pz.BatchMismatch):
        _verify(token, pz.solve(token), pz.MemorySpentStore(), batch=other)


def test_other_client_is_rejected() -> None:
    token = _issue(client="alice")
    with pytest.raises(pz.ClientMismatch):
        _verify(token, pz.solve(token), pz.MemorySpentStore(), client="mallory")


def test_bad_signature_and_tampered_payload_are_rejected() -> None:
    token = _issue(bits=12)
    with pytest.raises(pz.BadSignature):
        _verify(token, 0, pz.MemorySpentStore(), secret=b"another-secret-of-16+bytes")
    # lower the difficulty in the payload: the signature no longer matches
    head, body, sig = token.split(".")
    payload = pz.parse_challenge(token)
    payload["bits"] = 0
    import json

    forged = f"{head}.{pz._b64(json.dumps(payload, separators=(',', ':'), sort_keys=True).encode())}.{sig}"
    with pytest.raises(pz.BadSignature):
        _verify(forged, 0, pz.MemorySpentStore())
    with pytest.raises(pz.MalformedChallenge):
        _verify("pow1.garbage", 0, pz.MemorySpentStore())


def test_insufficient_work_is_rejected_and_does_not_spend() -> None:
    store = pz.MemorySpentStore()
    token = _issue(bits=16)
    good = pz.solve(token)
    bad = next(n for n in range(10_000) if pz.leading_zero_bits(pz._digest(token, n)) < 16)
    with pytest.raises(pz.InsufficientWork):
        _verify(token, bad, store)
    with pytest.raises(pz.InsufficientWork):
        _verify(token, -1, store)
    assert len(store) == 0
    _verify(token, good, store)  # the honest solver can still use it


def test_bits_never_exceed_the_cap() -> None:
    with pytest.raises(ValueError):
        _issue(bits=pz.MAX_BITS + 1)
    with pytest.raises(ValueError):
        _issue(bits=-1)
    assert pz.parse_challenge(_issue(bits=pz.MAX_BITS))["bits"] == pz.MAX_BITS


def test_store_prunes_expired_ids() -> None:
    store = pz.MemorySpentStore()
    assert store.spend("a", expires=10.0, now=0.0)
    assert not store.spend("a", expires=10.0, now=5.0)
    assert store.spend("b", expires=30.0, now=20.0)  # prunes "a" (expired at 10)
    assert len(store) == 1


def test_batch_digest_binds_content_and_shape() -> None:
    x = torch.zeros(2, 1, 4, 4)
    assert pz.batch_digest(x) == pz.batch_digest(x.clone())
    assert pz.batch_digest(x) != pz.batch_digest(x.reshape(1, 2, 4, 4))
    y = x.clone()
    y[0, 0, 0, 0] = 1e-3
    assert pz.batch_digest(x) != pz.batch_digest(y)


def test_hash_rate_is_positive() -> None:
    assert pz.measure_hash_rate(0.05) > 1000
