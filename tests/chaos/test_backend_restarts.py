"""Backends that go away under running turns: Redis restarted empty, RabbitMQ
restarted, PostgreSQL unreachable for a few seconds. Each runs privately (its
own process, port and data), so the fault touches nothing else."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest

from tests.chaos.check import (
    AUTH,
    answer,
    model_calls,
    read_until,
    rebuilt_text,
    replay,
    start_turn,
    verify,
    watch,
)
from tests.chaos.conftest import CHAOS_ENV
from tests.conftest import POSTGRES_URL
from tests.e2e.cluster import Cluster, running_cluster
from tests.servers import PrivateRabbit, PrivateRedis, TcpProxy


def chunks_of(events: list[tuple[str, str]]) -> list[dict[str, object]]:
    return [json.loads(d) for _, d in events]


# -- Redis ---------------------------------------------------------------------------


@pytest.fixture
def redis_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Cluster, PrivateRedis]]:
    tmp = tmp_path_factory.mktemp("chaos-redis")
    redis = PrivateRedis(tmp)
    redis.start()
    env = {**CHAOS_ENV, "TURNRELAY_LEASE_TTL": "3s"}
    try:
        with running_cluster(tmp, apis=2, executors=2, redis_url=redis.url, extra_env=env) as c:
            yield c, redis
    finally:
        redis.kill()


def test_redis_restarted_empty_mid_turn(redis_cluster: tuple[Cluster, PrivateRedis]) -> None:
    cluster, redis = redis_cluster
    apis = [a.url for a in cluster.apis]
    text = "redis fake:tokens=120 fake:delay_ms=50"
    sid, turn_id = start_turn(apis[0], text)

    def restart_empty() -> None:
        redis.kill()
        time.sleep(0.5)
        redis.start()

    seen = read_until(apis[0], sid, turn_id, 10, restart_empty)
    # Caught up when its frames vanished, the reader resumes with its cursor and
    # rebuilds the message in-band from the writer's reset and snapshot (no 410).
    rest = watch(apis, sid, turn_id, cursor=seen[-1][0], first_api=1)
    assert any(c["type"] == "data-stream-reset" for c in rest.chunks)
    assert rebuilt_text(chunks_of(seen) + rest.chunks) == answer(120)
    whole = replay(apis[1], sid, turn_id)
    assert [c["type"] for c in chunks_of(whole)][:2] == ["data-stream-reset", "start"]
    assert rebuilt_text(chunks_of(whole)) == answer(120)
    # A cursor from before the loss is not in the restarted log, but the log
    # begins with a reset and a snapshot: that cursor rebuilds the message too.
    old = watch(apis, sid, turn_id, cursor=f"{turn_id}:2")
    assert old.chunks[0]["type"] == "data-stream-reset"
    assert rebuilt_text(old.chunks) == answer(120)
    # Only a cursor the log never had is gone.
    beyond = httpx.get(
        f"{apis[0]}/api/chat/sessions/{sid}/stream",
        headers=AUTH,
        params={"after": f"{turn_id}:100000"},
        timeout=10,
    )
    assert beyond.status_code == 410
    turn = httpx.get(f"{apis[0]}/api/chat/sessions/{sid}/turns/{turn_id}", headers=AUTH).json()
    assert (turn["status"], turn["attempt"]) == ("completed", 1)
    session = httpx.get(f"{apis[0]}/api/chat/sessions/{sid}", headers=AUTH).json()
    assert session["active_turn"] is None
    assert session["messages"][1]["content"] == answer(120)
    assert model_calls(cluster, text) == 1


# -- RabbitMQ ------------------------------------------------------------------------


@pytest.fixture
def rabbit_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Cluster, PrivateRabbit]]:
    tmp = tmp_path_factory.mktemp("chaos-rabbit")
    rabbit = PrivateRabbit(tmp)
    rabbit.start()
    env = {**CHAOS_ENV, "TURNRELAY_NUM_WORKERS": "2"}
    try:
        with running_cluster(tmp, apis=2, executors=2, amqp_url=rabbit.url, extra_env=env) as c:
            yield c, rabbit
    finally:
        rabbit.kill()


def test_rabbitmq_restarted_mid_turn(rabbit_cluster: tuple[Cluster, PrivateRabbit]) -> None:
    """Four turns run and two wait in the broker when it restarts: every one
    completes, once."""
    cluster, rabbit = rabbit_cluster
    apis = [a.url for a in cluster.apis]
    texts = [f"rabbit{i} fake:tokens=60 fake:delay_ms=50" for i in range(6)]
    turns = [start_turn(apis[i % 2], t) for i, t in enumerate(texts)]
    with ThreadPoolExecutor(6) as pool:
        futures = [
            pool.submit(watch, apis, sid, tid, first_api=i) for i, (sid, tid) in enumerate(turns)
        ]
        time.sleep(1.0)
        rabbit.stop()
        time.sleep(1.0)
        rabbit.start()
        watched = [f.result() for f in futures]
    for w, text in zip(watched, texts, strict=True):
        verify(cluster, w, text=text, expected=answer(60), calls=1)
    # The broker works again for new turns.
    sid, turn_id = start_turn(apis[0], "after the restart fake:tokens=3")
    verify(
        cluster,
        watch(apis, sid, turn_id),
        text="after the restart fake:tokens=3",
        expected=answer(3),
        attempts=1,
        calls=1,
    )


# -- PostgreSQL ----------------------------------------------------------------------


@pytest.fixture
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, TcpProxy]]:
    tmp = tmp_path_factory.mktemp("chaos-pg")
    target = urlsplit(POSTGRES_URL.replace("+asyncpg", ""))
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    proxy.start()
    through = POSTGRES_URL.replace(f":{target.port or 5432}/", f":{proxy.port}/")
    try:
        with running_cluster(
            tmp, apis=2, executors=2, postgres_url=through, extra_env=CHAOS_ENV
        ) as c:
            yield c, proxy
    finally:
        proxy.kill()


def test_postgres_unreachable_for_five_seconds_mid_turn(
    pg_cluster: tuple[Cluster, TcpProxy],
) -> None:
    cluster, proxy = pg_cluster
    apis = [a.url for a in cluster.apis]
    text = "pg fake:tokens=100 fake:delay_ms=50"
    sid, turn_id = start_turn(apis[0], text)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(watch, apis, sid, turn_id)
        time.sleep(1.0)
        proxy.kill()
        down_at = time.monotonic()
        # meanwhile a submit fails cleanly: 503, a JSON error, nothing half-written
        with httpx.Client(base_url=apis[1], headers=AUTH, timeout=30) as client:
            r = client.post(f"/api/chat/sessions/{sid}/turns", json={"message": "while down"})
        assert r.status_code == 503 and r.json()["code"] == "backend_unavailable"
        time.sleep(max(0.0, 5.0 - (time.monotonic() - down_at)))
        proxy.start()
        watched = future.result()
    verify(cluster, watched, text=text, expected=answer(100), attempts=1, calls=1)
    session = httpx.get(f"{apis[0]}/api/chat/sessions/{sid}", headers=AUTH, timeout=10).json()
    assert [m["content"] for m in session["messages"] if m["role"] == "user"] == [text]
