"""Request and response bodies of the gateway, and the batch parsers (JSON and ``.npy``).

A batch is (N, *input_shape) float in [0, 1]. JSON: ``{"inputs": [[[[...]]]]}``; binary:
``Content-Type: application/x-npy`` with a float32/float64 ``.npy`` body (read with
``allow_pickle=False``: nothing is unpickled). Answers come back the same way as they were asked.
A row refused by the detector's ``refuse`` policy is ``null`` in JSON and a row of NaN (probabilities) or
``-1`` (labels) in ``.npy``, with ``X-Refused-Rows`` giving how many.
"""

from __future__ import annotations

import io
import json
import math
import re
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

NPY = "application/x-npy"


class PredictResponse(BaseModel):
    """A JSON answer: (N, K) probabilities or (N,) labels."""

    output: Literal["probs", "labels"]
    rows: int = Field(description="rows answered (and counted against the key's budget)")
    remaining: int | None = Field(description="rows left in the key's budget (null: unlimited)")
    pow_bits: int | None = Field(default=None, description="proof-of-work bits paid for this batch")
    refused: list[int] | None = Field(default=None, description="indices of rows refused by the detector's refuse "
                                      "policy (null in outputs; released, not counted)")
    outputs: list[Any] = Field(description="(N, K) probabilities or (N,) int labels; null for a refused row")


class ErrorResponse(BaseModel):
    """Every refusal: a one-line ``detail`` saying what to do, and a machine-readable ``reason``."""

    detail: str
    reason: str
    remaining: int | None = None
    challenge: str | None = Field(default=None, description="428 only: the signed PoW challenge to solve")
    bits: int | None = None


class ModelInfo(BaseModel):
    dataset: str | None
    num_classes: int
    input_shape: list[int]
    class_names: list[str] | None = None
    output: Literal["probs", "labels"]
    kind: str
    defense: str | None = None
    pipeline: list[dict[str, Any]]
    split: dict[str, Any] | None = None
    max_rows: int
    pow: bool
    fingerprint: str


class Usage(BaseModel):
    name: str
    budget: int | None
    used: int
    remaining: int | None


def request_schema(input_shape: tuple[int, ...]) -> dict[str, Any]:
    """OpenAPI request body of ``/v1/predict`` for this input shape (JSON and ``.npy``)."""
    item: dict[str, Any] = {"type": "number", "minimum": 0, "maximum": 1}
    for size in reversed(input_shape):
        item = {"type": "array", "items": item, "minItems": size, "maxItems": size}
    batch = {"type": "array", "items": item, "minItems": 1}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {"inputs": batch}}},
        NPY: {"schema": {"type": "string", "format": "binary"}},
    }}}


class BadBatch(ValueError):
    """The body is not a batch (message says why)."""


def parse_json_batch(body: bytes) -> np.ndarray:
    """``{"inputs": nested lists}`` -> float32 array (shape not yet checked)."""
    try:
        doc = json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError):
        raise BadBatch("body is not JSON: send {\"inputs\": [...]} or an .npy body with Content-Type "
                       f"{NPY}") from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise BadBatch("JSON body needs an \"inputs\" field holding the (N, *input_shape) batch")
    bad = BadBatch("\"inputs\" must be a rectangular nested list of numbers")
    try:
        arr = np.asarray(doc["inputs"])
    except (ValueError, TypeError, OverflowError):
        raise bad from None
    if arr.dtype.kind not in "iuf":  # strings, booleans, objects: not numbers (numpy would coerce them)
        raise bad
    if (b"true" in body or b"false" in body) and any(c in json.dumps(doc["inputs"]) for c in "tf"):
        raise bad  # booleans mixed with numbers (true/false are the only letters t and f a number list can hold;
        # the raw body is searched first: re-encoding the batch costs more than parsing it)
    with np.errstate(over="ignore"):  # out-of-range numbers become inf, refused by the batch checks
        return arr.astype(np.float32)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


#: the header ``np.save`` writes for a little-endian float array in C order (version 1.0)
_NPY_HEADER = re.compile(rb"\{'descr': '<f([48])', 'fortran_order': False, 'shape': \(((?:\d+, )*\d*|\d+,)\), \} *\n")


def _fast_npy(body: bytes) -> np.ndarray | None:
    """The array of an ``np.save`` float32/float64 C-order body, read without ``np.load``'s header
    ``literal_eval`` (the costliest part of a small request); ``None`` for anything else."""
    if len(body) < 10 or body[:8] != b"\x93NUMPY\x01\x00":
        return None
    end = 10 + body[8] + 256 * body[9]
    m = _NPY_HEADER.fullmatch(body, 10, end)
    if m is None:
        return None
    dtype = np.dtype("<f4" if m.group(1) == b"4" else "<f8")
    shape = tuple(int(v) for v in m.group(2).split(b",") if v.strip())
    if len(body) - end != math.prod(shape) * dtype.itemsize:
        return None  # truncated or trailing bytes: np.load says what is wrong
    return np.frombuffer(body, dtype=dtype, offset=end).reshape(shape)


def parse_npy_batch(body: bytes) -> np.ndarray:
    """An ``.npy`` body -> float32 array (pickled object arrays refused)."""
    fast = _fast_npy(body)
    if fast is not None:
        return fast.astype(np.float32)  # a writable copy (frombuffer views the immutable body)
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise BadBatch("body is not a readable .npy array (np.save of a float32 array)") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
        raise BadBatch("the .npy array must be float32 or float64")
    return arr.astype(np.float32, copy=False)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


__all__ = ["BadBatch", "ErrorResponse", "ModelInfo", "NPY", "PredictResponse", "Usage", "npy_bytes",
           "parse_json_batch", "parse_npy_batch", "request_schema"]
