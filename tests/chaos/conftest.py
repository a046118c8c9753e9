"""Chaos scenarios: real processes (2 APIs, 2-3 executors, the fake model) over
real RabbitMQ, Redis and PostgreSQL, with real faults: kill -9, SIGSTOP/SIGCONT,
SIGTERM, servers killed and restarted under load. See ``check`` for what each
scenario holds the system to."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.e2e.cluster import Cluster
from tests.procs import Proc

pytestmark = pytest.mark.slow

# Settings every chaos cluster runs with: the production lease and liveness
# defaults (so recovery is what users get), a short API heartbeat for the readers.
CHAOS_ENV = {"TURNRELAY_HEARTBEAT_INTERVAL": "1", "TURNRELAY_REQUEUE_DELAY": "500ms"}


def active_turns(executor: Proc) -> int:
    try:
        return int(httpx.get(f"{executor.url}/health", timeout=2).json()["active_turns"])
    except httpx.HTTPError:
        return -1


def wait_until(predicate, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def running_on(cluster: Cluster) -> Proc:
    found: list[Proc] = []

    def any_running() -> bool:
        found[:] = [e for e in cluster.executors if e.popen.poll() is None and active_turns(e) > 0]
        return bool(found)

    wait_until(any_running, "an executor to run the turn")
    return found[0]
