"""Prometheus metrics of the gateway (text exposition format 0.0.4, no client library needed)."""

from __future__ import annotations

import threading
from collections import defaultdict

#: latency histogram buckets, seconds
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counters and one latency histogram; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[str, int] = defaultdict(int)      # by status code
        self.rejections: dict[str, int] = defaultdict(int)    # by reason
        self.rows = 0
        self.pow_bits_issued = 0
        self.pow_challenges = 0
        self.flagged: set[str] = set()
        self.rows_flagged = 0
        self.rows_refused = 0
        self._hist = [0] * (len(BUCKETS) + 1)
        self._sum = 0.0
        self._count = 0

    def observe(self, *, status: int, seconds: float, rows: int = 0, reason: str | None = None) -> None:
        with self._lock:
            self.requests[str(status)] += 1
            self.rows += rows
            if reason is not None:
                self.rejections[reason] += 1
            i = next((i for i, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))
            self._hist[i] += 1
            self._sum += seconds
            self._count += 1

    def challenge(self, bits: int) -> None:
        with self._lock:
            self.pow_challenges += 1
            self.pow_bits_issued += bits

    def detected(self, *, flagged: int, refused: int) -> None:
        with self._lock:
            self.rows_flagged += flagged
            self.rows_refused += refused

    def flag(self, key_id: str) -> None:
        with self._lock:
            self.flagged.add(key_id)

    def render(self) -> str:
        with self._lock:
            out = ["# HELP misleader_requests_total Prediction requests by HTTP status.",
                   "# TYPE misleader_requests_total counter"]
            out += [f'misleader_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            out += ["# HELP misleader_rows_total Rows answered.", "# TYPE misleader_rows_total counter",
                    f"misleader_rows_total {self.rows}",
                    "# HELP misleader_rejections_total Refused prediction requests by reason.",
                    "# TYPE misleader_rejections_total counter"]
            out += [f'misleader_rejections_total{{reason="{r}"}} {n}' for r, n in sorted(self.rejections.items())]
            out += ["# HELP misleader_pow_bits_issued_total Sum of proof-of-work bits of issued challenges.",
                    "# TYPE misleader_pow_bits_issued_total counter",
                    f"misleader_pow_bits_issued_total {self.pow_bits_issued}",
                    "# HELP misleader_pow_challenges_total Proof-of-work challenges issued.",
                    "# TYPE misleader_pow_challenges_total counter",
                    f"misleader_pow_challenges_total {self.pow_challenges}",
                    "# HELP misleader_flagged_clients Keys flagged by the detector.",
                    "# TYPE misleader_flagged_clients gauge", f"misleader_flagged_clients {len(self.flagged)}",
                    # which keys: on the status page (admin key) only, /metrics is not authenticated
                    "# HELP misleader_detector_rows_flagged_total Rows the detector flagged.",
                    "# TYPE misleader_detector_rows_flagged_total counter",
                    f"misleader_detector_rows_flagged_total {self.rows_flagged}",
                    "# HELP misleader_detector_rows_refused_total Flagged rows refused (refuse policy; not counted).",
                    "# TYPE misleader_detector_rows_refused_total counter",
                    f"misleader_detector_rows_refused_total {self.rows_refused}",
                    "# HELP misleader_request_seconds Prediction request latency.",
                    "# TYPE misleader_request_seconds histogram"]
            acc = 0
            for b, n in zip(BUCKETS, self._hist):
                acc += n
                out.append(f'misleader_request_seconds_bucket{{le="{b}"}} {acc}')
            out.append(f'misleader_request_seconds_bucket{{le="+Inf"}} {self._count}')
            out += [f"misleader_request_seconds_sum {self._sum:.6f}", f"misleader_request_seconds_count {self._count}"]
        return "\n".join(out) + "\n"


__all__ = ["BUCKETS", "Metrics"]
