"""`turnrelay db-manager` as a real process: its answers to bad input, how it
refuses to start, its probes, retried writes, and a SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import POSTGRES_URL, require_server
from tests.contract.conftest import pg_admin
from tests.procs import Proc, free_port, start
from turnrelay.errors import BackendUnavailable, TurnNotFound, Unauthorized
from turnrelay.store.base import NewTurn, TurnOutcome, TurnStatus
from turnrelay.store.migrate import migrate
from turnrelay.store.rpc_client import RpcExecutorStore
from turnrelay.store.sql import SqlChatStore

pytestmark = pytest.mark.postgres
SECRET = "bad-input-secret-0123456789abcdef"
AUTH = {"authorization": f"Bearer {SECRET}"}


@dataclass
class Manager:
    database_url: str
    proc: Proc
    tmp: Path


def _run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    require_server("PostgreSQL", POSTGRES_URL, 5432)
    name = f"turnrelay_dbm_{uuid.uuid4().hex[:10]}"
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"

    async def admin(sql: str) -> None:
        conn = await pg_admin(POSTGRES_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    _run(admin(f'CREATE DATABASE "{name}"'))
    _run(migrate(url))
    tmp = tmp_path_factory.mktemp("dbm")
    port = free_port()
    proc = start(
        "db-manager",
        ["db-manager", "--port", str(port)],
        env={"TURNRELAY_DATABASE_URL": url, "TURNRELAY_DATABASE_MANAGER_SECRET": SECRET},
        tmp=tmp,
        health_url=f"http://127.0.0.1:{port}/health",
    )
    proc.url = f"http://127.0.0.1:{port}"
    try:
        yield Manager(url, proc, tmp)
    finally:
        proc.stop()
        _run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def db(manager: Manager) -> AsyncIterator[SqlChatStore]:
    store = SqlChatStore(manager.database_url)
    await store.startup()
    try:
        yield store
    finally:
        await store.shutdown()


async def running_turn(db: SqlChatStore) -> str:
    s = await db.create_session("alice")
    t = (
        await db.submit_turn(NewTurn(session_id=s.id, user_id="alice", text="hi", model="fake:m"))
    ).turn
    assert await db.start_turn(t.id, 0) is not None
    return t.id


async def post(manager: Manager, method: str, body: object, **headers: str) -> httpx.Response:
    return await send(manager, "POST", f"/rpc/{method}", json=body, headers=headers)


async def send(manager: Manager, verb: str, path: str, **kw: object) -> httpx.Response:
    async with httpx.AsyncClient(base_url=manager.proc.url, timeout=30) as http:
        return await http.request(verb, path, **kw)  # type: ignore[arg-type]


FINISH = {"status": "completed", "content": "x", "parts": [], "error": None, "usage": None}


async def test_no_secret_or_a_wrong_one_is_401_and_runs_nothing(
    manager: Manager, db: SqlChatStore
) -> None:
    turn_id = await running_turn(db)
    body = {"turn_id": turn_id, "attempt": 1, "outcome": FINISH}
    key = {"idempotency-key": uuid.uuid4().hex}
    for headers in (
        key,
        {**key, "authorization": "Bearer wrong"},
        {**key, "authorization": f"Bearer {SECRET}x"},
        {**key, "authorization": SECRET},
    ):
        r = await post(manager, "finish_turn", body, **headers)
        assert r.status_code == 401, r.text
        assert r.json()["code"] == "bad_secret" and r.json()["error"] == "Unauthorized"
    assert (await db.get_turn(turn_id)).status is TurnStatus.RUNNING  # nothing ran
    # 401 comes before the body is read: a huge body without the secret is not read
    huge = await send(
        manager,
        "POST",
        "/rpc/finish_turn",
        content=b"x" * (1024 * 1024),
        headers={"content-type": "application/json"},
    )
    assert huge.status_code == 401


async def test_malformed_bodies_are_422_with_what_is_wrong(
    manager: Manager, db: SqlChatStore
) -> None:
    turn_id = await running_turn(db)
    key = {"idempotency-key": uuid.uuid4().hex}
    bad = await send(manager, "POST", "/rpc/get_turn", content=b"{not json", headers=AUTH)
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_params"
    cases = [
        ("get_turn", {}, "turn_id"),
        ("get_turn", {"turn_id": 5}, "turn_id"),
        ("get_turn", {"turn_id": "x" * 65}, "turn_id"),
        ("get_turn", {"turn_id": "a", "extra": 1}, "extra"),
        ("history", {"session_id": "s", "before_seq": -1}, "before_seq"),
        ("dispatch_next", {"session_id": "s", "republish_before": "2030-01-01T00:00:00"}, "tz"),
        ("finish_turn", {"turn_id": turn_id, "attempt": 1, "outcome": {"status": "running"}}, ""),
        ("finish_turn", {"turn_id": turn_id, "attempt": 1, "outcome": {"status": "nope"}}, ""),
        ("unpublished_heads", {"before": "2030-01-01T00:00:00Z", "limit": 0}, "limit"),
    ]
    for method, body, _where in cases:
        r = await post(manager, method, body, **AUTH, **key)
        assert r.status_code == 422, (method, body, r.text)
        assert r.json()["code"] == "invalid_params" and r.json()["detail"], r.text
        assert "Traceback" not in r.text
    # a write without a call id, or with a malformed one
    body = {"turn_id": turn_id, "attempt": 1, "outcome": FINISH}
    r = await post(manager, "finish_turn", body, **AUTH)
    assert r.status_code == 422 and r.json()["code"] == "no_call_id"
    r = await post(manager, "finish_turn", body, **AUTH, **{"idempotency-key": "short"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_call_id"
    assert (await db.get_turn(turn_id)).status is TurnStatus.RUNNING


async def test_unknown_method_404_wrong_verb_405_too_large_413(manager: Manager) -> None:
    r = await post(manager, "drop_everything", {}, **AUTH)
    assert r.status_code == 404 and r.json()["code"] == "unknown_method"
    r = await post(manager, "submit_turn", {}, **AUTH)  # the API's, not the executor's
    assert r.status_code == 404
    assert (await send(manager, "GET", "/rpc/get_turn", headers=AUTH)).status_code == 405
    big = b'{"turn_id": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    r = await send(manager, "POST", "/rpc/get_turn", content=big, headers=AUTH)
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"


async def test_an_unknown_turn_is_404_named_by_its_class(manager: Manager) -> None:
    r = await post(manager, "get_turn", {"turn_id": str(uuid.uuid4())}, **AUTH)
    assert r.status_code == 404
    assert (r.json()["error"], r.json()["code"]) == ("TurnNotFound", "turn_not_found")


async def test_a_repeated_call_id_answers_as_the_first(manager: Manager, db: SqlChatStore) -> None:
    turn_id = await running_turn(db)
    body = {"turn_id": turn_id, "attempt": 1, "outcome": FINISH}
    key = uuid.uuid4().hex
    first = await post(manager, "finish_turn", body, **AUTH, **{"idempotency-key": key})
    repeat = await post(manager, "finish_turn", body, **AUTH, **{"idempotency-key": key})
    fresh = {"idempotency-key": uuid.uuid4().hex}
    other = await post(manager, "finish_turn", body, **AUTH, **fresh)
    assert [r.json()["result"] for r in (first, repeat, other)] == [True, True, False]


async def test_the_client_raises_the_services_error_classes(manager: Manager) -> None:
    client = RpcExecutorStore(manager.proc.url, secret=SECRET)
    await client.startup()
    try:
        with pytest.raises(TurnNotFound):
            await client.get_turn(str(uuid.uuid4()))
    finally:
        await client.shutdown()
    wrong = RpcExecutorStore(manager.proc.url, secret="not-the-secret-at-all")
    with pytest.raises(Unauthorized):
        await wrong.startup()  # it pings with its secret before the executor starts
    await wrong.shutdown()
    gone = RpcExecutorStore(f"http://127.0.0.1:{free_port()}", secret=SECRET, retry_for=0.5)
    with pytest.raises(BackendUnavailable):
        await gone.startup()
    await gone.shutdown()


@contextlib.asynccontextmanager
async def answer_dropping_proxy(target_port: int) -> AsyncIterator[tuple[int, list[int]]]:
    """A TCP proxy whose first connection forwards the request and then closes
    without the answer: the call ran, the caller never heard. Later
    connections pass both ways. Yields its port and the number of connections."""
    seen: list[int] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        seen.append(1)
        up_r, up_w = await asyncio.open_connection("127.0.0.1", target_port)
        if len(seen) == 1:
            request = await client_r.read(65536)
            up_w.write(request)
            await up_w.drain()
            await up_r.read(65536)  # the answer, dropped
            client_w.transport.abort()
            up_w.close()
            return
        await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, seen
    finally:
        server.close()


async def test_a_finish_whose_answer_was_lost_is_retried_and_answers_won(
    manager: Manager, db: SqlChatStore
) -> None:
    turn_id = await running_turn(db)
    target = int(manager.proc.url.rsplit(":", 1)[1])
    async with answer_dropping_proxy(target) as (port, seen):
        client = RpcExecutorStore(f"http://127.0.0.1:{port}", secret=SECRET)
        client._http = httpx.AsyncClient(  # startup() would spend the dropped connection
            base_url=f"http://127.0.0.1:{port}", headers={"authorization": f"Bearer {SECRET}"}
        )
        try:
            won = await client.finish_turn(turn_id, 1, TurnOutcome(TurnStatus.COMPLETED, "ok"))
        finally:
            await client.shutdown()
    assert len(seen) == 2  # the retry went out on a new connection
    assert won  # the retry of a finish that won answers "won", not "lost"
    done = await db.get_turn(turn_id)
    assert done.status is TurnStatus.COMPLETED and done.attempt == 1


def _cli(args: list[str], env: dict[str, str], tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "turnrelay.cli", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp,
    )


def test_it_refuses_to_start_unsafe_or_unusable(manager: Manager) -> None:
    url = {"TURNRELAY_DATABASE_URL": manager.database_url}
    port = str(free_port())
    cases = [
        (["--host", "0.0.0.0", "--port", port], url, "TURNRELAY_DATABASE_MANAGER_SECRET"),
        (
            ["--port", port],
            {**url, "TURNRELAY_DATABASE_MANAGER_SECRET": "short"},
            "at least 16",
        ),
        (["--port", port], {}, "not SQLite"),
        (["--port", port], {"TURNRELAY_DATABASE_URL": "sqlite+aiosqlite:///x.db"}, "not SQLite"),
        (
            ["--port", port],
            {"TURNRELAY_DATABASE_URL": POSTGRES_URL},  # never migrated
            "turnrelay migrate",
        ),
    ]
    for args, env, message in cases:
        r = _cli(["db-manager", *args], env, manager.tmp)
        assert r.returncode == 2, (args, env, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_an_executor_needs_one_way_to_the_database(manager: Manager) -> None:
    env = {
        "TURNRELAY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/",
        "TURNRELAY_REDIS_URL": "redis://127.0.0.1:6379/0",
        "TURNRELAY_MODEL": "openai:fake",
    }
    r = _cli(["executor"], env, manager.tmp)
    assert r.returncode == 2 and "TURNRELAY_DATABASE_MANAGER_URL" in r.stderr, r.stderr
    r = _cli(["executor"], {**env, "TURNRELAY_DATABASE_MANAGER_URL": "db:8005"}, manager.tmp)
    assert r.returncode == 2 and "http(s)://" in r.stderr, r.stderr
    r = _cli(
        ["executor"],
        {
            **env,
            "TURNRELAY_DATABASE_MANAGER_URL": manager.proc.url,
            "TURNRELAY_DATABASE_MANAGER_SECRET": "not-the-secret-at-all",
        },
        manager.tmp,
    )
    assert r.returncode == 2 and "db-manager secret" in r.stderr, r.stderr


async def test_probes_and_metrics(manager: Manager) -> None:
    from turnrelay.store.migrate import head_revision

    health = (await send(manager, "GET", "/health")).json()
    assert health == {"status": "ok", "schema": head_revision()}
    assert (await send(manager, "GET", "/ready")).status_code == 200
    await post(manager, "ping", {}, **AUTH)
    text = (await send(manager, "GET", "/metrics")).text
    assert 'turnrelay_rpc_calls_total{method="ping",status="200"}' in text
    assert 'turnrelay_rpc_seconds_bucket{le="0.001",method="ping"}' in text


def test_sigterm_ends_it_cleanly(manager: Manager) -> None:
    port = free_port()
    proc = start(
        "db-manager-term",
        ["db-manager", "--port", str(port)],
        env={"TURNRELAY_DATABASE_URL": manager.database_url},
        tmp=manager.tmp,
        health_url=f"http://127.0.0.1:{port}/ready",
    )
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.popen.wait(20) == 0, proc.log()
    assert "Traceback" not in proc.log()
