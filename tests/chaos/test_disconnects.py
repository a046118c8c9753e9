"""200 disconnects mid-turn, each client resuming on the other API replica with
its cursor: nothing lost, nothing repeated."""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.chaos.check import answer, start_turn, verify, watch
from tests.chaos.conftest import CHAOS_ENV
from tests.e2e.cluster import Cluster, running_cluster

TURNS = 20
DISCONNECTS_PER_TURN = 10


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(
        tmp_path_factory.mktemp("chaos-disconnects"), apis=2, executors=2, extra_env=CHAOS_ENV
    ) as c:
        yield c


def test_two_hundred_disconnects_lose_and_repeat_nothing(cluster: Cluster) -> None:
    apis = [a.url for a in cluster.apis]
    texts = [f"disc{i} fake:tokens=60 fake:delay_ms=40" for i in range(TURNS)]
    turns = [start_turn(apis[i % 2], text) for i, text in enumerate(texts)]

    def read(i: int):  # type: ignore[no-untyped-def]
        sid, turn_id = turns[i]
        return watch(
            apis, sid, turn_id, disconnects=DISCONNECTS_PER_TURN, rng=random.Random(i), first_api=i
        )

    with ThreadPoolExecutor(TURNS) as pool:
        watched = list(pool.map(read, range(TURNS)))
    assert sum(w.reconnects for w in watched) >= TURNS * DISCONNECTS_PER_TURN
    for w, text in zip(watched, texts, strict=True):
        verify(cluster, w, text=text, expected=answer(60), attempts=1, calls=1)
