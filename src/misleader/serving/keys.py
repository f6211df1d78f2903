"""API keys: ``msk_<32 random bytes, url-safe>``; the store keeps only their sha256.

A key has 256 bits of entropy, so a plain sha256 (no salt, no slow hash) cannot be reversed or
guessed; it is shown once by ``misleader keys add`` and never again.
"""

from __future__ import annotations

import hashlib
import secrets

from misleader.serving.store import KeyRecord, Store

PREFIX = "msk_"


def hash_key(key: str) -> str:
    """Hex sha256 of an API key (what the store keeps)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key."""
    return PREFIX + secrets.token_urlsafe(32)


def create_key(store: Store, *, name: str, budget: int | None, rate: str | None = None,
               admin: bool = False) -> tuple[str, KeyRecord]:
    """Create a key; returns ``(key, record)`` — the key itself exists nowhere else afterwards."""
    if rate is not None:
        check_rate(rate)
    key = new_key()
    return key, store.add_key(name=name, key_hash=hash_key(key), budget=budget, rate=rate, admin=admin)


def check_rate(rate: str) -> str:
    """A ``limits`` rate string (``100/second``, ``10 per minute``); ``MisleaderError`` otherwise."""
    from misleader.errors import MisleaderError

    try:
        from limits import parse_many

        parse_many(rate)
    except ImportError:
        raise MisleaderError("rate limits need the serve extra: pip install 'misleader[serve]'") from None
    except ValueError:
        raise MisleaderError(f"rate {rate!r} not understood: write e.g. 100/second or 1000/hour") from None
    return rate


def authenticate(store: Store, key: str) -> KeyRecord | None:
    """The record of ``key`` (revoked ones included), ``None`` for an unknown key."""
    if not key or not key.startswith(PREFIX) or len(key) > 200:
        return None
    return store.key_by_hash(hash_key(key))


__all__ = ["PREFIX", "authenticate", "check_rate", "create_key", "hash_key", "new_key"]
