"""Scale-out of the gateway under Ray Serve: ``misleader serve DIR --ray --replicas N --db postgresql://...``.

Each replica is one Ray actor that builds the same FastAPI app as ``misleader serve`` (the model loaded once
per replica, its own connection to the store); Ray Serve's HTTP proxy spreads requests over the replicas.
Budgets stay exact across replicas because every reservation is one transaction in the *shared* store
(PostgreSQL): no replica keeps a count of its own. Proof-of-work challenges are signed with one secret that
all replicas must share (``--pow-secret-file``): a challenge issued by one replica is verified by another.

The app is built on the replica (``__serve_build_asgi_app__``), never pickled from the driver: the model,
the store connection and the metrics registry belong to the process that serves them.

Ray is an optional extra (``pip install 'misleader[ray]'`` plus ``ray[serve]``); importing this module does
not import Ray.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, Callable

from misleader.errors import MisleaderError

log = logging.getLogger(__name__)

#: the Serve application's name (one gateway per Ray cluster)
APP_NAME = "misleader-gateway"

#: requests one replica accepts at once (Ray Serve's default, 5, makes its proxy refuse a 32-client load with
#: 503s although the gateway's handler is asynchronous and its store calls run on a thread pool)
MAX_ONGOING_REQUESTS = 64

#: Ray Serve's proxy checks, loosened for small machines: with its defaults (5 s to become ready, 3 failed
#: checks) the HTTP proxy of a 2-core machine under load is killed and restarted forever before it has
#: imported its web stack, and the gateway never answers. A value already in the environment wins.
PROXY_CHECK_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


def _import_serve() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise MisleaderError(f"--ray needs Ray Serve ({exc.name or exc} is missing): "
                             "pip install 'ray[serve]' (or 'misleader[ray]')") from None
    return ray, serve


def deployment(*, build_app: Callable[[], Any], replicas: int, cpus_per_replica: float = 1.0) -> Any:
    """A bound Ray Serve deployment of ``replicas`` gateway replicas.

    Args:
        build_app: called once on each replica; returns the ASGI (FastAPI) app. It travels to the replicas
            by cloudpickle, so it must capture only plain settings (paths, URLs, numbers), never a model or
            a connection.
        replicas: number of replicas (>= 1).
        cpus_per_replica: Ray's ``num_cpus`` reservation per replica (may be fractional).
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise MisleaderError(f"--replicas must be a positive integer, got {replicas!r}")
    _, serve = _import_serve()

    class GatewayReplica:
        """One replica: builds the gateway app in its own process."""

        def __init__(self, builder: Callable[[], Any]) -> None:
            self._builder = builder

        def __serve_build_asgi_app__(self) -> Any:  # noqa: N802 - Ray Serve's hook name
            return self._builder()

    cls = serve.ingress()(GatewayReplica)
    dep = serve.deployment(cls, name="gateway", num_replicas=replicas, max_ongoing_requests=MAX_ONGOING_REQUESTS,
                           ray_actor_options={"num_cpus": float(cpus_per_replica)})
    return dep.bind(build_app)


def run(*, build_app: Callable[[], Any], replicas: int, host: str, port: int, address: str | None = None,
        cpus_per_replica: float = 1.0, blocking: bool = True) -> None:
    """Start Ray (or join ``address``), then serve the gateway on ``http://host:port/`` with ``replicas`` replicas.

    With ``blocking=True`` this returns only when interrupted (Ctrl-C shuts Serve and Ray down).
    """
    ray, serve = _import_serve()
    app = deployment(build_app=build_app, replicas=replicas, cpus_per_replica=cpus_per_replica)
    for key, value in PROXY_CHECK_ENV.items():  # read by Serve's controller, a process the local Ray starts
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": max(replicas * cpus_per_replica, 1.0) + 1}))
    serve.start(http_options={"host": host, "port": port})
    t0 = time.perf_counter()
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    log.info("ray serve: %d replica(s) ready on http://%s:%d in %.1fs", replicas, host, port, time.perf_counter() - t0)
    print(f"misleader: serving under Ray Serve, {replicas} replica(s), on http://{host}:{port}", flush=True)
    if not blocking:
        return

    def _stop(signum: int, frame: Any) -> None:  # SIGTERM (kill, systemd, a bench) shuts down like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


__all__ = ["APP_NAME", "MAX_ONGOING_REQUESTS", "PROXY_CHECK_ENV", "deployment", "run"]
