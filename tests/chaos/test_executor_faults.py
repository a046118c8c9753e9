"""Executors that die (kill -9), freeze (SIGSTOP past the liveness TTL, then
SIGCONT: a zombie) or stop (SIGTERM) while turns run and clients read them."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest

from tests.chaos.check import Watched, answer, replay, start_turn, verify, watch
from tests.chaos.conftest import CHAOS_ENV, active_turns, running_on, wait_until
from tests.e2e.cluster import Cluster, running_cluster
from tests.procs import Proc


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(
        tmp_path_factory.mktemp("chaos-executors"), apis=2, executors=0, extra_env=CHAOS_ENV
    ) as c:
        yield c


def finished(executor: Proc) -> float:
    text = httpx.get(f"{executor.url}/metrics", timeout=5).text
    return sum(
        float(v)
        for v in re.findall(r"^turnrelay_turns_finished_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    )


def watch_all(
    cluster: Cluster, turns: list[tuple[str, str]], pool: ThreadPoolExecutor
) -> list[Future[Watched]]:
    apis = [a.url for a in cluster.apis]
    return [
        pool.submit(watch, apis, sid, turn_id, first_api=i)
        for i, (sid, turn_id) in enumerate(turns)
    ]


def test_kill_9_with_five_running_turns_all_complete_elsewhere(cluster: Cluster) -> None:
    victim = cluster.start_executor()
    texts = [f"kill{i} fake:tokens=150 fake:delay_ms=50" for i in range(5)]
    turns = [start_turn(cluster.apis[0].url, t) for t in texts]
    wait_until(lambda: active_turns(victim) == 5, "five turns running on one executor")
    cluster.start_executor()
    cluster.start_executor()
    with ThreadPoolExecutor(5) as pool:
        futures = watch_all(cluster, turns, pool)
        time.sleep(0.5)  # the readers are attached and streaming
        victim.popen.send_signal(signal.SIGKILL)
        victim.popen.wait(5)
        watched = [f.result() for f in futures]
    for w, text in zip(watched, texts, strict=True):
        verify(cluster, w, text=text, expected=answer(150), attempts=2, calls=2)


def test_a_frozen_executor_is_taken_over_and_writes_nothing_when_it_wakes(
    cluster: Cluster,
) -> None:
    cluster.start_executor()
    cluster.start_executor()
    text = "zombie fake:tokens=80 fake:delay_ms=50"
    sid, turn_id = start_turn(cluster.apis[0].url, text)
    zombie = running_on(cluster)
    other = next(e for e in cluster.executors if e is not zombie)
    with ThreadPoolExecutor(1) as pool:
        future = watch_all(cluster, [(sid, turn_id)], pool)[0]
        time.sleep(0.5)
        zombie.popen.send_signal(signal.SIGSTOP)  # past the liveness TTL: a takeover
        try:
            watched = future.result()
        finally:
            zombie.popen.send_signal(signal.SIGCONT)
    verify(cluster, watched, text=text, expected=answer(80), attempts=2, calls=2)
    # Awake again, the zombie notices it lost the turn and drops it, writing nothing.
    wait_until(lambda: active_turns(zombie) == 0, "the zombie to drop its stale run")
    time.sleep(1.0)  # a frame it might still write would land by now
    assert replay(cluster.apis[0].url, sid, turn_id) == watched.events
    # ... and goes on serving other turns.
    before = finished(zombie), finished(other)
    more = [start_turn(cluster.apis[1].url, f"after{i} fake:tokens=3") for i in range(8)]
    for sid2, turn2 in more:
        watch([a.url for a in cluster.apis], sid2, turn2)
    after = finished(zombie), finished(other)
    assert after[0] > before[0], "the woken executor served no turn"
    assert sum(after) - sum(before) == 8


def test_sigterm_on_an_executor_drains_its_attached_turns(cluster: Cluster) -> None:
    leaving = cluster.start_executor()
    texts = [f"drain{i} fake:tokens=40 fake:delay_ms=50" for i in range(3)]
    turns = [start_turn(cluster.apis[0].url, t) for t in texts]
    wait_until(lambda: active_turns(leaving) == 3, "three turns running")
    staying = cluster.start_executor()
    with ThreadPoolExecutor(3) as pool:
        futures = watch_all(cluster, turns, pool)
        time.sleep(0.3)
        leaving.popen.send_signal(signal.SIGTERM)
        # new turns go to the executor that stays, while the other drains
        late = start_turn(cluster.apis[1].url, "late fake:tokens=3")
        watched = [f.result() for f in futures]
    assert leaving.popen.wait(20) == 0
    for w, text in zip(watched, texts, strict=True):
        verify(cluster, w, text=text, expected=answer(40), attempts=1, calls=1)
    late_watched = watch([a.url for a in cluster.apis], *late)
    verify(cluster, late_watched, text="late fake:tokens=3", expected=answer(3), attempts=1)
    assert finished(staying) >= 1


def test_sigterm_on_an_api_sends_its_readers_to_the_other_replica(cluster: Cluster) -> None:
    cluster.start_executor()
    texts = [f"apiterm{i} fake:tokens=60 fake:delay_ms=40" for i in range(3)]
    turns = [start_turn(cluster.apis[1].url, t) for t in texts]
    going = cluster.apis[1]
    apis = [going.url, cluster.apis[0].url]  # every reader starts on the one that stops
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(watch, apis, sid, turn_id) for sid, turn_id in turns]
        time.sleep(0.6)
        going.popen.send_signal(signal.SIGTERM)
        watched = [f.result() for f in futures]
    assert going.popen.wait(10) == 0
    cluster.apis.remove(going)
    for w, text in zip(watched, texts, strict=True):
        assert w.reconnects >= 1  # the stream ended early and resumed elsewhere
        verify(cluster, w, text=text, expected=answer(60), attempts=1, calls=1)
