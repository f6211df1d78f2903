"""The HTTP gateway: a FastAPI app serving one victim or defense folder with keys, budgets and PoW.

Design: ``../shared/research/pow-same.md`` part C. Endpoints:

* ``POST /v1/predict`` — a batch as JSON (``{"inputs": ...}``) or ``.npy`` (``Content-Type:
  application/x-npy``); answered in the same encoding. ``Authorization: Bearer KEY``.
* ``GET /v1/model`` (public metadata, pipeline summary), ``GET /v1/usage`` (the caller's budget),
  ``GET /healthz``, ``GET /metrics`` (Prometheus), ``GET /`` (status page; admin key).

Order of a prediction: body size cap (413) -> key (401 unknown, 403 revoked) -> rate limit (429 +
``Retry-After``) -> batch parse and checks (400/413/422) -> proof-of-work (428 with a signed challenge
bound to the key and the batch's sha256; the resent batch with ``X-PoW-Challenge`` / ``X-PoW-Nonce``
is verified and the challenge spent) -> budget reservation in one transaction (429 with
``remaining``; nothing partial) -> the detector (``--detector``: every row scored, the policy of
:mod:`misleader.serving.policy` applied to the flagged rows) and the model, off the event loop ->
commit + query log row + the key's detector statistics in one transaction (released if the model
fails; rows refused by the ``refuse`` policy released, not counted). Every refusal is logged with its
status and reason. Errors never carry a traceback.

Fast path: ``POST /v1/predict`` is answered by :class:`GatewayApp` before FastAPI's middleware stack,
router and dependency solving (the same :func:`answer_predict` as the declared route, which stays for the
OpenAPI schema and is what a mounted or prefixed app reaches). With the model and the store this cheap,
that stack was most of the event loop's time per request, and the event loop thread was the server's
bottleneck (one core at 100 %, the model's worker threads waiting). Requests run in the gateway's own
thread pool (``loop.run_in_executor``), which costs less per call than anyio's limiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers

from misleader.pow import puzzle
from misleader.serving import schemas
from misleader.serving.keys import authenticate
from misleader.serving.metrics import Metrics
from misleader.serving.model import DEFAULT_MAX_BATCH_ROWS, ServedModel
from misleader.serving.policy import DetectorPolicy, PowPolicy
from misleader.serving.store import RESERVATION_TIMEOUT, BudgetExceeded, KeyRecord, Store

log = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 1024


@dataclass
class GatewayConfig:
    """Everything :func:`create_app` needs besides the folder and the store."""

    output: str = "probs"
    device: str = "cpu"
    max_rows: int = DEFAULT_MAX_ROWS
    max_body_bytes: int | None = None   # default: what max_rows rows take as JSON text
    pow: PowPolicy | None = None
    pow_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    detector: DetectorPolicy | None = None
    reservation_timeout: float = RESERVATION_TIMEOUT
    #: concurrent requests answered by one forward pass of at most this many rows (0: a pass per request);
    #: see :mod:`misleader.serving.model`
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS


class Refused(Exception):
    """A refusal with its HTTP status, reason and extra body fields / headers."""

    def __init__(self, status: int, reason: str, detail: str, *, headers: dict[str, str] | None = None,
                 rows: int = 0, key_id: str | None = None, **fields: Any) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail
        self.headers, self.fields, self.rows, self.key_id = headers or {}, fields, rows, key_id

    def response(self) -> JSONResponse:
        body = {"detail": self.detail, "reason": self.reason, **self.fields}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


_ERR = {"model": schemas.ErrorResponse}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {schemas.NPY: {"schema": {"type": "string", "format": "binary"}}}},
    400: _ERR, 401: _ERR, 403: _ERR, 413: _ERR, 422: _ERR, 428: _ERR, 429: _ERR}


class Gateway:
    """The app's state: the model, the store, the limiter, the metrics."""

    def __init__(self, *, model: ServedModel, store: Store, config: GatewayConfig) -> None:
        from limits import parse
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        self.model, self.store, self.config = model, store, config
        self.metrics = Metrics()
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self._parse_rate = parse
        if config.detector is not None:  # flagged clients survive a restart: their statistics are in the store
            for key_id, stats in store.detector_stats().items():
                if config.detector.client_flagged(stats):
                    self.metrics.flag(key_id)
        per_row = 24 * math.prod(model.input_shape)  # generous JSON text per row
        self.max_body = config.max_body_bytes or per_row * config.max_rows + 4096

    # ------------------------------------------------------------------ pieces
    def key_of(self, token: str | None) -> KeyRecord:
        if not token:
            raise Refused(401, "no_key", "send your API key as 'Authorization: Bearer KEY'",
                          headers={"WWW-Authenticate": "Bearer"})
        rec = authenticate(self.store, token)
        if rec is None:
            raise Refused(401, "bad_key", "unknown API key: check it, or ask the operator for one",
                          headers={"WWW-Authenticate": "Bearer"})
        if rec.revoked:
            raise Refused(403, "revoked", "this API key was revoked: ask the operator for a new one", key_id=rec.id)
        return rec

    def rate_limit(self, rec: KeyRecord) -> None:
        if not rec.rate:
            return
        item = self._parse_rate(rec.rate)
        if not self.limiter.hit(item, rec.id):
            reset = self.limiter.get_window_stats(item, rec.id).reset_time
            wait = max(1, math.ceil(reset - time.time()))
            raise Refused(429, "rate", f"rate limit {rec.rate} reached: retry after {wait} s",
                          headers={"Retry-After": str(wait)}, key_id=rec.id)

    def parse(self, body: bytes, content_type: str, key_id: str) -> torch.Tensor:
        try:
            arr = (schemas.parse_npy_batch(body) if content_type.startswith(schemas.NPY)
                   else schemas.parse_json_batch(body))
        except schemas.BadBatch as exc:
            raise Refused(400, "bad_body", str(exc), key_id=key_id) from None
        if arr.ndim >= 1 and arr.shape[0] > self.config.max_rows:
            raise Refused(413, "too_many_rows", f"{arr.shape[0]} rows in one request; at most "
                          f"{self.config.max_rows}: split the batch", key_id=key_id)
        x = torch.from_numpy(np.ascontiguousarray(arr))
        try:  # the oracle's own check (and message), once: its checked copy is what the model answers
            return self.model.check(x)
        except ValueError as exc:
            raise Refused(422, "bad_batch", f"{exc} (expected (N, {', '.join(map(str, self.model.input_shape))})"
                          " floats in [0, 1])", key_id=key_id) from None

    def check_pow(self, rec: KeyRecord, x: torch.Tensor, digest: str, headers: Any) -> int | None:
        policy = self.config.pow
        if policy is None:
            return None
        token, nonce = headers.get("x-pow-challenge"), headers.get("x-pow-nonce")
        n = int(x.shape[0])
        if token and nonce is not None:
            try:
                solution = int(nonce)
            except ValueError:
                raise Refused(400, "pow_invalid", "X-PoW-Nonce must be a non-negative integer", key_id=rec.id,
                              rows=n) from None
            try:
                payload = puzzle.verify(token, solution=solution, secret=self.config.pow_secret, client=rec.id,
                                        batch_sha256=digest, store=self.store)
                return int(payload["bits"])
            except puzzle.ChallengeExpired:
                pass  # a fresh challenge below
            except puzzle.PowError as exc:
                raise Refused(400, "pow_invalid", str(exc), key_id=rec.id, rows=n) from None
        remaining = self.store.get_key(rec.id).remaining
        if remaining is not None and remaining < n:  # do not make a client pay for a refused batch
            raise Refused(429, "budget", f"query of {n} rows refused: {remaining} of the key's budget of "
                          f"{rec.budget} remaining", remaining=remaining, key_id=rec.id, rows=n,
                          headers={"X-Budget-Remaining": str(remaining)})
        bits = puzzle.check_bits(int(policy.bits(key_id=rec.id, x=x)))
        token = puzzle.issue_challenge(secret=self.config.pow_secret, client=rec.id, batch_sha256=digest, bits=bits,
                                       ttl=policy.ttl)
        self.metrics.challenge(bits)
        raise Refused(428, "pow_required", f"solve the proof-of-work challenge ({bits} bits) and resend the same "
                      "batch with X-PoW-Challenge and X-PoW-Nonce", challenge=token, bits=bits, key_id=rec.id,
                      rows=n, pow_bits=bits, headers={"X-PoW-Challenge": token})

    def apply_policy(self, det: DetectorPolicy, x: torch.Tensor,
                     flagged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The answer under the detector policy: ``(outputs (N, K) or (N,), refused (N,) bool or None)``.

        ``log``: the model on every row. ``gate``: the model on the unflagged rows, the gate folder on
        the flagged ones. ``refuse``: the model on the unflagged rows; flagged rows get NaN (probs) or
        -1 (labels) and are marked refused.
        """
        if det.policy == "log" or not bool(flagged.any()):
            return self.model.predict(x, checked=True), None
        keep = ~flagged
        probs = self.model.output == "probs"
        shape = (x.shape[0], self.model.num_classes) if probs else (x.shape[0],)
        out = (torch.full(shape, float("nan"), dtype=torch.float32) if probs
               else torch.full(shape, -1, dtype=torch.int64))
        if bool(keep.any()):
            out[keep] = self.model.predict(x[keep], checked=True).to(out.dtype)
        if det.policy == "gate":
            out[flagged] = det.gate.predict(x[flagged]).to(out.dtype)
            return out, None
        return out, flagged

    def note_flags(self, key_id: str, flagged_n: int, refused_n: int) -> None:
        """Metrics of one scored request; a key crossing the flagged-client line joins ``metrics.flagged``."""
        self.metrics.detected(flagged=flagged_n, refused=refused_n)
        if key_id in self.metrics.flagged:
            return
        stats = self.store.detector_stats(key_id).get(key_id)
        if stats is not None and self.config.detector.client_flagged(stats):
            self.metrics.flag(key_id)

    # ------------------------------------------------------------------ the request, in a worker thread
    def predict(self, *, token: str | None, body: bytes, content_type: str, headers: Any) -> Response:
        t0 = time.perf_counter()
        rec: KeyRecord | None = None
        digest: str | None = None
        try:
            rec = self.key_of(token)
            self.rate_limit(rec)
            x = self.parse(body, content_type, rec.id)
            digest = puzzle.batch_digest(x)
            bits = self.check_pow(rec, x, digest, headers)
            n = int(x.shape[0])
            try:
                rid = self.store.reserve(rec.id, n, timeout=self.config.reservation_timeout)
            except BudgetExceeded as exc:
                raise Refused(429, "budget", str(exc), remaining=exc.remaining, key_id=rec.id, rows=n,
                              headers={"X-Budget-Remaining": str(exc.remaining)}) from None
            det = self.config.detector
            flagged_n = refused_n = 0
            score: float | None = None
            refused: torch.Tensor | None = None
            try:
                if det is None:
                    out = self.model.predict(x, checked=True)
                else:
                    scores, flagged = det.score(x)
                    flagged_n, score = int(flagged.sum()), float(scores.double().mean())
                    out, refused = self.apply_policy(det, x, flagged)
                    refused_n = 0 if refused is None else int(refused.sum())
            except BaseException:
                self.store.release(rid, log_row={"key_id": rec.id, "rows": n, "batch_sha256": digest,
                                                 "status": 500, "reason": "model_failed",
                                                 "output": self.model.output, "pow_bits": bits})
                raise
            answered = n - refused_n
            ms = 1000 * (time.perf_counter() - t0)
            done = self.store.commit(rid, answered=answered,
                                     scores=None if det is None else (n, score * n, flagged_n),
                                     log_row={"key_id": rec.id, "batch_sha256": digest, "status": 200,
                                              "output": self.model.output, "pow_bits": bits,
                                              "detector_score": score, "latency_ms": ms,
                                              "flagged_rows": None if det is None else flagged_n,
                                              "reason": f"refused {refused_n} rows" if refused_n else None})
            if done is None:
                raise Refused(503, "timeout", "the request outlived its reservation: retry", key_id=rec.id)
            if det is not None:
                self.note_flags(rec.id, flagged_n, refused_n)
            remaining = done.remaining
            self.metrics.observe(status=200, seconds=time.perf_counter() - t0, rows=answered)
            hdr = {"X-Rows": str(answered), "X-Budget-Remaining": "" if remaining is None else str(remaining)}
            if bits is not None:
                hdr["X-PoW-Bits"] = str(bits)
            if refused_n:  # (how many rows were flagged is not told: gate and log stay covert)
                hdr["X-Refused-Rows"] = str(refused_n)
            arr = out.cpu().numpy()
            if content_type.startswith(schemas.NPY):
                return Response(schemas.npy_bytes(arr), media_type=schemas.NPY, headers=hdr)
            outputs = arr.tolist()
            idx: list[int] | None = None
            if refused is not None and refused_n:
                idx = torch.nonzero(refused).flatten().tolist()
                for i in idx:
                    outputs[i] = None
            return JSONResponse({"output": self.model.output, "rows": answered, "remaining": remaining,
                                 "pow_bits": bits, "refused": idx, "outputs": outputs}, headers=hdr)
        except Refused as r:
            secs = time.perf_counter() - t0
            self.metrics.observe(status=r.status, seconds=secs, reason=r.reason)
            with contextlib.suppress(Exception):
                self.store.log_query({"key_id": r.key_id, "rows": r.rows, "batch_sha256": digest,
                                      "status": r.status, "reason": r.reason, "output": self.model.output,
                                      "pow_bits": r.fields.get("pow_bits"), "latency_ms": 1000 * secs})
            return r.response()
        except Exception:  # noqa: BLE001 - logged here; the client gets no traceback
            log.exception("prediction failed")
            self.metrics.observe(status=500, seconds=time.perf_counter() - t0, reason="internal")
            return JSONResponse({"detail": "internal error: see the server log", "reason": "internal"},
                                status_code=500)


#: threads answering requests (as many as anyio's default limiter: requests beyond wait for a thread)
REQUEST_THREADS = 40


def bearer_token(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` header, else ``None`` (FastAPI's ``HTTPBearer(auto_error=False)``)."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


async def answer_predict(gw: Gateway, pool: ThreadPoolExecutor, headers: Headers,
                         body: AsyncIterator[bytes]) -> Response:
    """``POST /v1/predict``: the body (capped at ``gw.max_body``), then :meth:`Gateway.predict` in ``pool``."""
    declared = headers.get("content-length")
    too_big = Refused(413, "body_too_large", f"body over {gw.max_body} bytes: send fewer rows per request (or .npy)")
    if declared is not None and declared.isdigit() and int(declared) > gw.max_body:
        return too_big.response()
    chunks, size = [], 0
    async for chunk in body:
        size += len(chunk)
        if size > gw.max_body:
            return too_big.response()
        chunks.append(chunk)
    call = functools.partial(gw.predict, token=bearer_token(headers.get("authorization")), body=b"".join(chunks),
                             content_type=headers.get("content-type", ""), headers=headers)
    return await asyncio.get_running_loop().run_in_executor(pool, call)


class _Disconnected(Exception):
    """The client went away before its body arrived."""


class GatewayApp(FastAPI):
    """The FastAPI app, with ``POST /v1/predict`` answered before the middleware stack (module docstring)."""

    predict_fast: Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]],
                           Awaitable[None]] | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:  # noqa: D102
        if (self.predict_fast is not None and scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"] == "/v1/predict" and not scope.get("root_path")):
            await self.predict_fast(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(*, folder: str, store: Store, config: GatewayConfig | None = None,
               model: ServedModel | None = None) -> FastAPI:
    """The FastAPI app for ``folder`` (the model is loaded here, once)."""
    config = config or GatewayConfig()
    model = model or ServedModel(folder, output=config.output, device=config.device,  # type: ignore[arg-type]
                                 max_batch_rows=config.max_batch_rows)
    gw = Gateway(model=model, store=store, config=config)
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY (from `misleader keys add`)")
    app = GatewayApp(title="misleader gateway", version="1",
                     description="Predictions of a defended model, with API keys, exact budgets and proof-of-work.")
    app.state.gateway = gw
    pool = ThreadPoolExecutor(max_workers=REQUEST_THREADS, thread_name_prefix="gateway")

    async def predict_fast(scope: dict, receive: Any, send: Any) -> None:
        async def body() -> AsyncIterator[bytes]:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    raise _Disconnected
                yield msg.get("body", b"")
                if not msg.get("more_body", False):
                    return
        try:
            response = await answer_predict(gw, pool, Headers(scope=scope), body())
        except _Disconnected:
            return
        except Exception:  # noqa: BLE001 - logged here; the client gets no traceback
            log.exception("unhandled error on /v1/predict")
            response = JSONResponse({"detail": "internal error: see the server log", "reason": "internal"},
                                    status_code=500)
        await response(scope, receive, send)

    app.predict_fast = predict_fast

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:  # no traceback leaves the server
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": "internal error: see the server log", "reason": "internal"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid request')}", "reason": "invalid"},
                            status_code=422)

    @app.post("/v1/predict", response_model=schemas.PredictResponse, responses=_RESPONSES,
              openapi_extra=schemas.request_schema(model.input_shape),
              summary="Answer a batch (JSON or .npy); counts its rows against the key's budget")
    async def predict(request: Request,
                      creds: HTTPAuthorizationCredentials | None = Security(bearer)) -> Response:  # noqa: ARG001
        # (`creds` declares the bearer scheme in the schema; reached only where the fast path is off, e.g. under a root_path; documents the endpoint)
        return await answer_predict(gw, pool, request.headers, request.stream())

    @app.get("/v1/model", response_model=schemas.ModelInfo, summary="What is served (public metadata only)")
    async def model_info() -> dict[str, Any]:
        return model.info(max_rows=config.max_rows, pow_enabled=config.pow is not None)

    @app.get("/v1/usage", response_model=schemas.Usage, responses={401: _ERR, 403: _ERR},
             summary="The caller's budget")
    async def usage(creds: HTTPAuthorizationCredentials | None = Security(bearer)) -> Any:
        def read() -> Any:
            try:
                rec = gw.key_of(creds.credentials if creds else None)
            except Refused as r:
                return r.response()
            return {"name": rec.name, "budget": rec.budget, "used": rec.used, "remaining": rec.remaining}
        return await run_in_threadpool(read)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(gw.metrics.render(), media_type="text/plain; version=0.0.4")

    json_err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}

    @app.get("/", response_class=HTMLResponse, responses={401: json_err, 403: json_err},
             summary="Status page (admin key)")
    async def status(creds: HTTPAuthorizationCredentials | None = Security(bearer)) -> Response:
        from misleader.serving.status_page import render_status

        def page() -> Response:
            try:
                rec = gw.key_of(creds.credentials if creds else None)
            except Refused as r:
                return r.response()
            if not rec.admin:
                return Refused(403, "not_admin", "the status page needs an admin key "
                               "(misleader keys add NAME --admin)").response()
            info = {**model.info(max_rows=config.max_rows, pow_enabled=config.pow is not None),
                    "folder": model.folder.name}
            pow_desc = "off" if config.pow is None else config.pow.describe()
            det = config.detector
            html = render_status(info=info, keys=store.list_keys(), queries=store.last_queries(30),
                                 pow_desc=pow_desc, rows=model.rows_answered, flagged=gw.metrics.flagged,
                                 detector_desc="off" if det is None else det.describe(),
                                 detector_stats=store.detector_stats() if det is not None else None)
            return HTMLResponse(html)
        return await run_in_threadpool(page)

    return app


__all__ = ["GatewayConfig", "Gateway", "create_app"]
