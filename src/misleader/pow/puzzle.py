"""The proof-of-work puzzle: SHA-256 leading-zero bits over a signed, expiring, single-use challenge.

Paper: Dziedzic et al., "Increasing the Cost of Model Extraction with Calibrated Proof of Work",
ICLR 2022, https://arxiv.org/abs/2201.09243 (reference code: cleverhans-lab/model-extraction-iclr,
``pow/hashcash.py``, ``server.py``).

A challenge token is ``pow1.<payload>.<signature>`` (both parts URL-safe base64, no padding). The
payload is a JSON object ``{"v": 1, "id", "client", "batch", "bits", "iat", "exp"}``; the signature
is HMAC-SHA256 of ``"pow1." + payload`` under the server's secret. A solution is a non-negative
integer ``nonce`` such that ``sha256(token + ":" + str(nonce))`` starts with ``bits`` zero bits,
so checking it costs one hash.

Deviations from the reference code:
  * SHA-256 instead of SHA-1, and a signed JSON token instead of a hashcash v1 stamp (binary
    leading zeros are counted, as the reference does).
  * The challenge is bound to the sha256 of the query batch and to the client, expires, and is
    single-use (a :class:`SpentStore`); the reference's demo server binds it to neither, keeps no
    double-spend store, and speaks pickle over TCP (nothing here unpickles anything).
  * Difficulty is capped at :data:`MAX_BITS` whatever the calibration asks for.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from typing import Protocol

from misleader.errors import MisleaderError

#: token format tag (also the signed prefix)
VERSION = "pow1"
#: hard cap on difficulty: 2^40 expected hashes is hours even for a native solver on one core
MAX_BITS = 40


class PowError(MisleaderError):
    """A challenge or its solution is not acceptable."""


class MalformedChallenge(PowError):
    """The token cannot be parsed (truncated, not base64/JSON, wrong version)."""


class BadSignature(PowError):
    """The token was not signed with this server's secret (forged or altered)."""


class ChallengeExpired(PowError):
    """The token's expiry time has passed."""


class ChallengeReplayed(PowError):
    """The token was already spent."""


class BatchMismatch(PowError):
    """The solution is presented with a different query batch than the challenge was issued for."""


class ClientMismatch(PowError):
    """The solution is presented by another client than the challenge was issued to."""


class InsufficientWork(PowError):
    """The nonce's hash does not start with the required number of zero bits."""


class SpentStore(Protocol):
    """Where spent challenge ids are recorded until they expire (an SQL table can implement this)."""

    def spend(self, challenge_id: str, *, expires: float, now: float) -> bool:
        """Atomically mark ``challenge_id`` spent; ``False`` when it already was (a replay)."""


class MemorySpentStore:
    """A thread-safe in-memory :class:`SpentStore`; expired ids are pruned as new ones arrive."""

    def __init__(self) -> None:
        self._spent: dict[str, float] = {}
        self._lock = threading.Lock()

    def spend(self, challenge_id: str, *, expires: float, now: float) -> bool:
        with self._lock:
            self._spent = {k: e for k, e in self._spent.items() if e >= now}
            if challenge_id in self._spent:
                return False
            self._spent[challenge_id] = expires
            return True

    def __len__(self) -> int:
        return len(self._spent)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, signed: str) -> str:
    return _b64(hmac.new(secret, signed.encode(), hashlib.sha256).digest())


def check_bits(bits: int) -> int:
    """``bits`` as an int in [0, MAX_BITS]; ``ValueError`` otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= MAX_BITS:
        raise ValueError(f"puzzle bits must be an integer in [0, {MAX_BITS}], got {bits!r}")
    return bits


def issue_challenge(*, secret: bytes, client: str, batch_sha256: str, bits: int, ttl: float,
                    now: float | None = None) -> str:
    """A signed challenge token for ``client`` to answer the batch whose sha256 is ``batch_sha256``.

    Args:
        secret: the server's HMAC key (at least 16 bytes).
        client: the client's id (e.g. its API key id).
        batch_sha256: hex sha256 of the query batch (:func:`batch_digest`).
        bits: required leading zero bits, in [0, MAX_BITS].
        ttl: seconds until the challenge expires.
        now: the current time (default ``time.time()``).
    """
    if len(secret) < 16:
        raise ValueError("the PoW secret must be at least 16 bytes")
    if ttl <= 0:
        raise ValueError(f"ttl must be > 0 seconds, got {ttl}")
    check_bits(bits)
    now = time.time() if now is None else float(now)
    payload = {"v": 1, "id": secrets.token_hex(16), "client": str(client), "batch": str(batch_sha256),
               "bits": bits, "iat": now, "exp": now + float(ttl)}
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    signed = f"{VERSION}.{body}"
    return f"{signed}.{_sign(secret, signed)}"


def parse_challenge(token: str) -> dict:
    """The payload of a token, *without* checking its signature (for solvers and display)."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3 or parts[0] != VERSION:
        raise MalformedChallenge(f"not a {VERSION} challenge token: pass the token exactly as the server issued it")
    try:
        payload = json.loads(_unb64(parts[1]))
        keys = {"v", "id", "client", "batch", "bits", "iat", "exp"}
        if not isinstance(payload, dict) or set(payload) != keys:
            raise ValueError("fields")
        check_bits(payload["bits"])
    except (ValueError, TypeError) as exc:
        raise MalformedChallenge(f"challenge payload cannot be read ({exc}): the token is truncated or corrupted") from None
    return payload


def _digest(token: str, nonce: int) -> bytes:
    return hashlib.sha256(f"{token}:{nonce}".encode()).digest()


def leading_zero_bits(digest: bytes) -> int:
    """Number of leading zero bits of ``digest``."""
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def solve(token: str, *, start: int = 0) -> int:
    """Reference solver: the smallest nonce >= ``start`` whose hash has the challenge's zero bits.

    Expected work is 2^bits hashes.
    """
    bits = parse_challenge(token)["bits"]
    limit = 1 << (256 - bits)
    base = hashlib.sha256(f"{token}:".encode())
    nonce = start
    while True:
        h = base.copy()
        h.update(str(nonce).encode())
        if int.from_bytes(h.digest(), "big") < limit:
            return nonce
        nonce += 1


def verify(token: str, *, solution: int, secret: bytes, client: str, batch_sha256: str, store: SpentStore,
           now: float | None = None) -> dict:
    """Check a solved challenge (one hash) and mark it spent; returns its payload.

    Raises:
        MalformedChallenge, BadSignature, ChallengeExpired, ClientMismatch, BatchMismatch,
        InsufficientWork, ChallengeReplayed: the specific reason it is refused.
    """
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise MalformedChallenge("not a challenge token: pass the token exactly as the server issued it")
    if not hmac.compare_digest(_sign(secret, f"{parts[0]}.{parts[1]}"), parts[2]):
        raise BadSignature("challenge signature does not match: the token was altered or issued by another server")
    payload = parse_challenge(token)
    now = time.time() if now is None else float(now)
    if now > payload["exp"]:
        raise ChallengeExpired("challenge expired: request a new one and solve it before it expires")
    if not hmac.compare_digest(payload["client"], str(client)):
        raise ClientMismatch("challenge was issued to another client: request your own")
    if not hmac.compare_digest(payload["batch"], str(batch_sha256)):
        raise BatchMismatch("challenge was issued for another query batch: send the batch it was issued for")
    if isinstance(solution, bool) or not isinstance(solution, int) or solution < 0:
        raise InsufficientWork(f"solution must be a non-negative integer nonce, got {solution!r}")
    if leading_zero_bits(_digest(token, solution)) < payload["bits"]:
        raise InsufficientWork(f"nonce {solution} does not give {payload['bits']} leading zero bits: solve the challenge")
    if not store.spend(payload["id"], expires=payload["exp"], now=now):
        raise ChallengeReplayed("challenge already used: request a new one for each batch")
    return payload


def batch_digest(x) -> str:  # noqa: ANN001 - torch.Tensor or bytes
    """Hex sha256 of a query batch: of its float32 C-contiguous bytes (shape included) or of raw bytes."""
    if isinstance(x, (bytes, bytearray)):
        return hashlib.sha256(x).hexdigest()
    t = x.detach().to("cpu").float().contiguous()
    h = hashlib.sha256(json.dumps(list(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def measure_hash_rate(seconds: float = 1.0) -> float:
    """Hashes per second of :func:`solve`'s inner loop on this machine (one core), over ``seconds``."""
    token = f"{VERSION}.bench.{secrets.token_hex(8)}"
    base = hashlib.sha256(f"{token}:".encode())
    limit = 1 << 200
    count, nonce = 0, 0
    t0 = time.perf_counter()
    deadline = t0 + float(seconds)
    while True:
        for _ in range(4096):
            h = base.copy()
            h.update(str(nonce).encode())
            if int.from_bytes(h.digest(), "big") < limit:
                pass
            nonce += 1
        count += 4096
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - t0)
