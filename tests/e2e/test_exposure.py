"""Without `TURNRELAY_API_KEYS` every caller is one local user: `turnrelay api`
listens only on loopback then, like `serve`, and the shipped compose file starts
nothing until a token is set (real `turnrelay api` processes)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.cluster import running_cluster
from tests.procs import ROOT, free_port, start

pytestmark = pytest.mark.slow


def test_api_refuses_a_public_host_without_api_keys(tmp_path: Path) -> None:
    with running_cluster(tmp_path, apis=0, executors=0) as cluster:
        env = {k: v for k, v in cluster.env().items() if k != "TURNRELAY_API_KEYS"}
        port = free_port()
        proc = start(
            "api-open", ["api", "--host", "0.0.0.0", "--port", str(port)], env=env, tmp=tmp_path
        )
        try:
            code = proc.popen.wait(30)
        except subprocess.TimeoutExpired:
            proc.stop()
            pytest.fail(f"`turnrelay api --host 0.0.0.0` without keys kept running:\n{proc.log()}")
        log = proc.log()
        assert code == 2, log
        assert "refusing to listen on 0.0.0.0" in log and "TURNRELAY_API_KEYS" in log
        assert "Traceback" not in log


def test_api_listens_with_keys_or_on_loopback(tmp_path: Path) -> None:
    with running_cluster(tmp_path, apis=0, executors=0) as cluster:
        keyed = start(
            "api-keyed",
            ["api", "--host", "0.0.0.0", "--port", str(port := free_port())],
            env=cluster.env(),
            tmp=tmp_path,
            health_url=f"http://127.0.0.1:{port}/health",
        )
        cluster.apis.append(keyed)
        anonymous = httpx.post(f"http://127.0.0.1:{port}/api/chat/sessions", timeout=10)
        assert anonymous.status_code == 401
        keyless = {k: v for k, v in cluster.env().items() if k != "TURNRELAY_API_KEYS"}
        local = start(
            "api-local",
            ["api", "--host", "127.0.0.1", "--port", str(port := free_port())],
            env=keyless,
            tmp=tmp_path,
            health_url=f"http://127.0.0.1:{port}/health",
        )
        cluster.apis.append(local)
        assert (
            httpx.post(f"http://127.0.0.1:{port}/api/chat/sessions", timeout=10).status_code == 201
        )


def test_compose_ships_no_default_token() -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    seen = []
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        if isinstance(env, list):  # the `KEY=value` form
            env = dict(item.partition("=")[::2] for item in env)
        if "TURNRELAY_API_KEYS" not in env:
            continue
        value = str(env["TURNRELAY_API_KEYS"])
        seen.append(name)
        # `${VAR:?message}` (or `${VAR?message}`) makes `docker compose up` fail
        # while the variable is unset; any other form can hand out a known token.
        assert re.fullmatch(r"\$\{TURNRELAY_API_KEYS:?\?[^}]+\}", value), (name, value)
    assert "api" in seen
