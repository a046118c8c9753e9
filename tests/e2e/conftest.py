"""Fixtures for end-to-end tests: `turnrelay serve` and `turnrelay fake-llm` as real processes."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.procs import FakeLLMProc, Proc, start_fake_llm, start_serve


@pytest.fixture(scope="session")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeLLMProc]:
    fake = start_fake_llm(tmp_path_factory.mktemp("llm"))
    yield fake
    fake.proc.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, llm: FakeLLMProc) -> Iterator[Proc]:
    proc = start_serve(
        tmp_path_factory.mktemp("serve"),
        llm,
        {
            "TURNRELAY_MODELS": "openai:fake,openai:other",
            "TURNRELAY_API_KEYS": "tok-alice=alice,tok-bob=bob",
        },
    )
    yield proc
    proc.stop()


@pytest.fixture
def client(server: Proc) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.url, timeout=30, headers={"authorization": "Bearer tok-alice"}
    ) as c:
        yield c


@pytest.fixture
def bob(server: Proc) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.url, timeout=30, headers={"authorization": "Bearer tok-bob"}
    ) as c:
        yield c


def new_session(client: httpx.Client) -> str:
    r = client.post("/api/chat/sessions")
    assert r.status_code == 201
    return str(r.json()["id"])
