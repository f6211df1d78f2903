"""Ray Serve wiring without Ray: fake ``ray`` / ``serve`` modules record what ``ray_serve.run`` does."""

from __future__ import annotations

import os

import pytest

from misleader.errors import MisleaderError
from misleader.serving import ray_serve


class _FakeRay:
    def __init__(self) -> None:
        self.init_kwargs: dict | None = None
        self.env_at_init: dict[str, str | None] = {}

    def is_initialized(self) -> bool:
        return self.init_kwargs is not None

    def init(self, **kwargs) -> None:
        self.init_kwargs = kwargs
        self.env_at_init = {k: os.environ.get(k) for k in ray_serve.PROXY_CHECK_ENV}


class _FakeDeployment:
    def __init__(self, cls, **kwargs) -> None:
        self.cls, self.kwargs = cls, kwargs

    def bind(self, *args):
        return ("bound", self, args)


class _FakeServe:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def ingress(self):
        return lambda cls: cls

    def deployment(self, cls, **kwargs):
        return _FakeDeployment(cls, **kwargs)

    def start(self, **kwargs) -> None:
        self.calls.append(("start", kwargs))

    def run(self, app, **kwargs) -> None:
        self.calls.append(("run", app, kwargs))


@pytest.fixture()
def fakes(monkeypatch):
    ray, serve = _FakeRay(), _FakeServe()
    monkeypatch.setattr(ray_serve, "_import_serve", lambda: (ray, serve))
    for key in ray_serve.PROXY_CHECK_ENV:
        monkeypatch.delenv(key, raising=False)
    return ray, serve


def test_run_loosens_the_proxy_checks_before_ray_starts_and_keeps_a_users_value(fakes, monkeypatch):
    ray, serve = fakes
    monkeypatch.setenv("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "7")
    ray_serve.run(build_app=lambda: "app", replicas=2, host="127.0.0.1", port=8123, cpus_per_replica=0.5,
                  blocking=False)
    assert ray.env_at_init == {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120",
                               "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "7"}
    assert ray.init_kwargs["num_cpus"] == 2.0  # two half-CPU replicas + one for the proxy and controller
    start, run = serve.calls
    assert start == ("start", {"http_options": {"host": "127.0.0.1", "port": 8123}})
    _, dep, args = run[1]
    assert dep.kwargs["num_replicas"] == 2 and dep.kwargs["ray_actor_options"] == {"num_cpus": 0.5}
    assert dep.kwargs["max_ongoing_requests"] == ray_serve.MAX_ONGOING_REQUESTS > 32
    assert run[2] == {"name": ray_serve.APP_NAME, "route_prefix": "/", "blocking": False}
    # the app is built on the replica, from the builder it was given
    assert dep.cls(*args).__serve_build_asgi_app__() == "app"


def test_an_existing_cluster_address_is_joined_without_a_cpu_count(fakes):
    ray, _ = fakes
    ray_serve.run(build_app=lambda: None, replicas=1, host="127.0.0.1", port=1, address="ray://h:10001",
                  blocking=False)
    assert ray.init_kwargs["address"] == "ray://h:10001" and "num_cpus" not in ray.init_kwargs


@pytest.mark.parametrize("replicas", [0, -1, True, 1.5])
def test_bad_replica_counts_are_refused(fakes, replicas):
    with pytest.raises(MisleaderError, match="--replicas"):
        ray_serve.deployment(build_app=lambda: None, replicas=replicas)
