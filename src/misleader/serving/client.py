"""``misleader.connect(URL, api_key=...)``: an :class:`~misleader.oracle.base.Oracle` over the HTTP gateway.

Same interface as a local oracle (``query(x)`` for (N, *input_shape) floats in [0, 1] -> (N, K)
probabilities or (N,) labels; ``budget`` / ``queries_used`` / ``remaining`` of the *local* view).
Batches travel as ``.npy`` (float32, exact). The server's budget refusal raises
:class:`~misleader.errors.QueryBudgetExceeded`; a 428 proof-of-work challenge is solved here
(:func:`misleader.pow.puzzle.solve`) and the batch resent, the time paid kept in ``pow_seconds``;
a rate-limit 429 waits ``Retry-After`` and retries. A batch over the server's ``max_rows`` is sent in
chunks after checking that the key's remaining budget covers all of it.

Rows refused by a server's detector (``--policy refuse``: NaN / ``-1`` rows, ``X-Refused-Rows``) are
answered here as the in-process ``same-gate --refuse`` defense answers them: the uniform row 1/K (its
top-1, class 0, in labels mode); ``refused_rows`` counts them. The server does not count refused rows
against the key; the local accountant counts every row sent.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np
import torch

from misleader.errors import MisleaderError, QueryBudgetExceeded
from misleader.oracle.base import Accountant, Oracle, OutputMode, check_budget, plain_batch

log = logging.getLogger(__name__)
NPY = "application/x-npy"


def is_url(target: Any) -> bool:
    """Whether a ``--target`` names a server (``http://`` / ``https://``) rather than a folder."""
    return isinstance(target, str) and target.startswith(("http://", "https://"))


class GatewayClient:
    """Thin HTTP client of the gateway (keep-alive; every refusal turned into a one-line error)."""

    def __init__(self, url: str, *, api_key: str | None, timeout: float = 120.0, max_rate_waits: int = 100,
                 http: Any = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if http is None:
            http = httpx.Client(base_url=self.url, timeout=timeout)
        http.headers.update(headers)
        self._http = http  # an httpx.Client (tests pass FastAPI's TestClient)
        self.max_rate_waits = max_rate_waits
        self.pow_seconds = 0.0
        self.pow_bits = 0
        self.pow_challenges = 0
        self.refused_rows = 0

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            return self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise MisleaderError(f"cannot reach {self.url}{path} ({type(exc).__name__}: {exc}): is "
                                 "`misleader serve` running there?") from None

    @staticmethod
    def _detail(r: Any) -> dict[str, Any]:
        try:
            body = r.json()
            return body if isinstance(body, dict) else {"detail": str(body)}
        except ValueError:
            return {"detail": r.text[:200] or f"HTTP {r.status_code}"}

    def _raise(self, r: Any) -> None:
        d = self._detail(r)
        detail, reason = str(d.get("detail")), d.get("reason")
        if r.status_code == 429 and reason == "budget":
            raise QueryBudgetExceeded(f"server refused: {detail}")
        if r.status_code in (400, 413, 422):
            raise ValueError(f"server refused the batch: {detail}")
        raise MisleaderError(f"{self.url}: HTTP {r.status_code}: {detail}")

    def get(self, path: str) -> dict[str, Any]:
        r = self._send("GET", path)
        if r.status_code != 200:
            self._raise(r)
        return r.json()

    def predict_npy(self, x: np.ndarray) -> np.ndarray:
        """One request (PoW and rate limits handled): float32 (N, ...) -> the server's answer array."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
        body = buf.getvalue()
        headers = {"Content-Type": NPY}
        waits = 0
        while True:
            r = self._send("POST", "/v1/predict", content=body, headers=headers)
            if r.status_code == 200:
                refused = int(r.headers.get("X-Refused-Rows", "0") or 0)
                if refused:
                    if not self.refused_rows:
                        log.warning("%s refuses rows its detector flags: answering them with the uniform row",
                                    self.url)
                    self.refused_rows += refused
                return np.load(io.BytesIO(r.content), allow_pickle=False)
            d = self._detail(r)
            if r.status_code == 428 and d.get("challenge"):
                from misleader.pow.puzzle import solve

                t0 = time.perf_counter()
                nonce = solve(d["challenge"])
                self.pow_seconds += time.perf_counter() - t0
                self.pow_bits += int(d.get("bits") or 0)
                self.pow_challenges += 1
                headers = {"Content-Type": NPY, "X-PoW-Challenge": d["challenge"], "X-PoW-Nonce": str(nonce)}
                continue
            if r.status_code == 429 and d.get("reason") == "rate" and waits < self.max_rate_waits:
                waits += 1
                time.sleep(float(r.headers.get("Retry-After", "1")))
                headers = {"Content-Type": NPY}
                continue
            self._raise(r)


class HttpOracle(Oracle):
    """An oracle whose answers come from a gateway (see the module docstring).

    Args:
        url: ``http://HOST:PORT`` of ``misleader serve``.
        api_key: the key from ``misleader keys add``.
        output: ``probs`` or ``labels`` (default: what the server answers; ``labels`` from a ``probs``
            server is the argmax of its answer).
        budget: a local cap on top of the key's budget (``None``: only the server's).
        accountant: the harness's accountant (the local true count).
        http: an ``httpx.Client`` to send through (default: a new one on ``url``).
    """

    def __init__(self, url: str, *, api_key: str | None, output: OutputMode | None = None,
                 budget: int | None = None, accountant: Accountant | None = None, timeout: float = 120.0,
                 http: Any = None) -> None:
        client = GatewayClient(url, api_key=api_key, timeout=timeout, http=http)
        info = client.get("/v1/model")
        served = info["output"]
        output = output or served
        if served == "labels" and output == "probs":
            raise MisleaderError(f"{url} answers labels only: use --labels hard / output='labels'")
        acct = accountant if accountant is not None else Accountant(check_budget(budget))
        super().__init__(num_classes=int(info["num_classes"]), input_shape=info["input_shape"], output=output,
                         accountant=acct, batch_size=int(info["max_rows"]))
        self.__acct = acct
        self.__client = client
        self.__served = served
        self.info = info

    @property
    def pow_seconds(self) -> float:
        """Seconds this client spent solving proof-of-work puzzles."""
        return self.__client.pow_seconds

    @property
    def refused_rows(self) -> int:
        """Rows the server's detector refused (answered here with the uniform row)."""
        return self.__client.refused_rows

    @property
    def pow_bits(self) -> int:
        """Sum of the bits of the puzzles solved."""
        return self.__client.pow_bits

    def usage(self) -> dict[str, Any]:
        """The key's budget as the server counts it: ``{name, budget, used, remaining}``."""
        return self.__client.get("/v1/usage")

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """See :meth:`misleader.oracle.base.Oracle.query`; the server counts the rows too."""
        xp = plain_batch(x, self.input_shape)
        n = int(xp.shape[0])
        self.__acct.reserve(n)
        try:
            out = self._answer(xp)
        except BaseException:
            self.__acct.refund(n)
            raise
        self.__acct.answered(n)
        return out.to(xp.device)

    def _answer(self, xp: torch.Tensor) -> torch.Tensor:
        arr = xp.detach().to("cpu", torch.float32).numpy()
        if len(arr) > self.batch_size:  # several requests: check the whole batch fits first (nothing partial)
            remaining = self.usage()["remaining"]
            if remaining is not None and remaining < len(arr):
                raise QueryBudgetExceeded(f"query of {len(arr)} rows refused: {remaining} of the key's budget "
                                          "remaining")
        parts = [self.__client.predict_npy(arr[i:i + self.batch_size]) for i in range(0, len(arr), self.batch_size)]
        out = torch.from_numpy(np.concatenate(parts))
        if self.__served == "probs":
            out = out.float()
            refused = out.isnan().any(dim=1)
            if bool(refused.any()):  # refused rows: the uniform row, as same-gate --refuse answers in process
                out[refused] = 1.0 / out.shape[1]
            return out.argmax(dim=1) if self.output == "labels" else out
        out = out.long()
        return out.clamp_min(0)  # a refused label (-1): class 0, the uniform row's top-1

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        if self.__served != "probs":
            raise MisleaderError("this server answers labels only")
        out = torch.from_numpy(self.__client.predict_npy(x.detach().cpu().float().numpy())).float()
        out[out.isnan().any(dim=1)] = 1.0 / out.shape[1]
        return out

    def close(self) -> None:
        self.__client.close()


def connect(url: str, *, api_key: str | None, output: OutputMode | None = None, budget: int | None = None,
            timeout: float = 120.0) -> HttpOracle:
    """An :class:`HttpOracle` on ``url`` (``misleader serve``) with ``api_key``."""
    return HttpOracle(url, api_key=api_key, output=output, budget=budget, timeout=timeout)


def open_remote(url: str, *, api_key: str | None, output: OutputMode = "probs",
                budget: int | None = None) -> tuple[HttpOracle, Accountant]:
    """The harness's entry (as :func:`misleader.oracle.load.open_accounted`): the oracle and its accountant."""
    acct = Accountant(check_budget(budget))
    return HttpOracle(url, api_key=api_key, output=output, accountant=acct), acct


__all__ = ["GatewayClient", "HttpOracle", "connect", "is_url", "open_remote"]
