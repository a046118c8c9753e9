"""The turn lifecycle in one process, on the in-memory twins and SQLite, with a
scripted runtime: fast checks of the executor and the API working together."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from claude_agent_sdk.types import SessionKey

from turnrelay.api.app import create_app
from turnrelay.errors import ModelError
from turnrelay.events.memory import MemoryEventLog
from turnrelay.executor.worker import Executor
from turnrelay.lease.memory import MemoryLease
from turnrelay.metrics import Metrics
from turnrelay.queue.memory import MemoryTurnQueue
from turnrelay.runtime.base import RuntimeEvent, StepFinish, StepStart, TextDelta, TurnContext
from turnrelay.settings import Settings
from turnrelay.storage.memory import MemoryObjectStore
from turnrelay.store.base import NewTurn, TurnStatus
from turnrelay.store.migrate import migrate
from turnrelay.store.sql import SqlChatStore
from turnrelay.transcript.store import TranscriptStore, session_prefix


class ScriptedRuntime:
    """Replies ``Echo: <text>`` in words; ``fail`` fails after one word; ``slow`` waits."""

    def __init__(self) -> None:
        self.contexts: list[TurnContext] = []
        self.gate = asyncio.Event()
        self.stopped: list[str] = []  # turns whose run ended before its answer did

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def run(self, ctx: TurnContext) -> AsyncGenerator[RuntimeEvent, None]:
        self.contexts.append(ctx)
        finished = False
        try:
            yield StepStart()
            for i, word in enumerate(f"Echo: {ctx.user_text}".split(" ")):
                if "slow" in ctx.user_text and i == 1:
                    await self.gate.wait()
                if "fail" in ctx.user_text and i == 1:
                    raise ModelError("model broke (502)")
                yield TextDelta(word if i == 0 else " " + word)
            yield StepFinish()
            finished = True
        finally:
            if not finished:
                self.stopped.append(ctx.turn_id)


class Harness:
    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.settings = Settings(
            _env_file=None,
            database_url=f"sqlite+aiosqlite:///{tmp}/t.db",
            model="openai:fake",
            num_workers=2,
            **settings,
        )
        self.runtime = ScriptedRuntime()
        self.store = SqlChatStore(self.settings.database_url)
        self.events = MemoryEventLog()
        self.queue = MemoryTurnQueue()
        self.metrics = Metrics("serve", 2)
        self.objects = MemoryObjectStore()
        self.executor = Executor(
            settings=self.settings,
            store=self.store,
            events=self.events,
            lease=MemoryLease(),
            queue=self.queue,
            runtimes={"openai": self.runtime},
            metrics=self.metrics,
            grace=1,
        )

        async def ready() -> None:
            await self.store.ping()

        self.app = create_app(
            settings=self.settings,
            store=self.store,
            events=self.events,
            queue=self.queue,
            metrics=self.metrics,
            objects=self.objects,
            readiness=ready,
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://t"
        )


def frames(body: str) -> list[tuple[str | None, str]]:
    out = []
    for block in body.split("\n\n"):
        ident, data = None, None
        for line in block.splitlines():
            if line.startswith("id: "):
                ident = line[4:]
            elif line.startswith("data: "):
                data = line[6:]
        if data is not None:
            out.append((ident, data))
    return out


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path)
    await migrate(harness.settings.database_url)
    await harness.store.startup()
    await harness.queue.startup()
    task = asyncio.create_task(harness.executor.run())
    try:
        yield harness
    finally:
        harness.executor.stop()
        await task
        await harness.client.aclose()
        await harness.store.shutdown()


async def test_turn_streams_and_persists(h: Harness) -> None:
    sid = (await h.client.post("/api/chat/sessions")).json()["id"]
    r = await h.client.post(f"/api/chat/sessions/{sid}/stream", json={"message": "hello there"})
    assert r.status_code == 200
    assert r.headers["x-vercel-ai-ui-message-stream"] == "v1"
    got = frames(r.text)
    assert got[-1] == (None, "[DONE]")
    chunks = [json.loads(d) for _, d in got[:-1]]
    types = [c["type"] for c in chunks]
    assert types[0] == "start" and types[-1] == "finish"
    assert "".join(c["delta"] for c in chunks if c["type"] == "text-delta") == "Echo: hello there"
    seqs = [int(i.rsplit(":", 1)[1]) for i, _ in got[:-1]]
    assert seqs == list(range(1, len(seqs) + 1))
    session = (await h.client.get(f"/api/chat/sessions/{sid}")).json()
    roles = [(m["role"], m["content"], m["status"]) for m in session["messages"]]
    assert roles == [
        ("user", "hello there", "completed"),
        ("assistant", "Echo: hello there", "completed"),
    ]
    assert chunks[0]["messageId"] == session["messages"][1]["id"]
    assert session["active_turn"] is None


async def test_model_failure_keeps_partial_answer(h: Harness) -> None:
    sid = (await h.client.post("/api/chat/sessions")).json()["id"]
    r = await h.client.post(f"/api/chat/sessions/{sid}/stream", json={"message": "fail now"})
    chunks = [json.loads(d) for _, d in frames(r.text)[:-1]]
    assert [c["type"] for c in chunks][-2:] == ["error", "finish"]
    assert chunks[-2]["errorText"] == "model broke (502)"
    turn_id = r.headers["x-turn-id"]
    turn = (await h.client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}")).json()
    assert turn["status"] == "failed" and turn["error"] == "model broke (502)"
    session = (await h.client.get(f"/api/chat/sessions/{sid}")).json()
    assert session["messages"][1]["content"] == "Echo:"


async def test_history_holds_only_earlier_turns(h: Harness) -> None:
    sid = (await h.client.post("/api/chat/sessions")).json()["id"]
    for text in ("one", "two", "three"):
        r = await h.client.post(f"/api/chat/sessions/{sid}/turns", json={"message": text})
        assert r.status_code == 202
    for _ in range(200):
        session = (await h.client.get(f"/api/chat/sessions/{sid}")).json()
        if session["active_turn"] is None:
            break
        await asyncio.sleep(0.02)
    assert [c.user_text for c in h.runtime.contexts] == ["one", "two", "three"]
    assert [[m.content for m in c.history] for c in h.runtime.contexts] == [
        [],
        ["one", "Echo: one"],
        ["one", "Echo: one", "two", "Echo: two"],
    ]


async def test_cancel_running_turn(h: Harness) -> None:
    sid = (await h.client.post("/api/chat/sessions")).json()["id"]
    r = await h.client.post(f"/api/chat/sessions/{sid}/turns", json={"message": "slow one"})
    turn_id = r.json()["turn_id"]
    for _ in range(200):
        if h.runtime.contexts:
            break
        await asyncio.sleep(0.01)
    c = await h.client.post(f"/api/chat/sessions/{sid}/cancel")
    assert c.status_code == 200
    assert c.json() == {"cancelled": True, "turn_id": turn_id}
    s = await h.client.get(f"/api/chat/sessions/{sid}/stream", params={"turn_id": turn_id})
    types = [json.loads(d)["type"] for _, d in frames(s.text)[:-1]]
    assert types[-2:] == ["abort", "finish"]
    turn = (await h.client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}")).json()
    assert turn["status"] == "cancelled"
    again = await h.client.post(f"/api/chat/sessions/{sid}/cancel")
    assert again.json() == {"cancelled": False, "turn_id": None, "reason": "no_active_turn"}


async def test_turn_timeout_fails_the_turn(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    harness.settings = harness.settings.model_copy(update={"turn_timeout": 0.3})
    harness.executor.runner.settings = harness.settings
    await migrate(harness.settings.database_url)
    await harness.store.startup()
    task = asyncio.create_task(harness.executor.run())
    try:
        client = harness.client
        sid = (await client.post("/api/chat/sessions")).json()["id"]
        r = await client.post(f"/api/chat/sessions/{sid}/stream", json={"message": "slow x"})
        chunks = [json.loads(d) for _, d in frames(r.text)[:-1]]
        assert [c["type"] for c in chunks][-2:] == ["error", "finish"]
        assert "timed out" in chunks[-2]["errorText"]
        turn = await client.get(f"/api/chat/sessions/{sid}/turns/{r.headers['x-turn-id']}")
        assert turn.json()["status"] == "failed"
    finally:
        harness.executor.stop()
        await task
        await harness.client.aclose()
        await harness.store.shutdown()


async def test_running_turn_shows_its_answer_so_far(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    harness.settings = harness.settings.model_copy(update={"lease_ttl": 0.3})
    harness.executor.runner.settings = harness.settings
    await migrate(harness.settings.database_url)
    await harness.store.startup()
    task = asyncio.create_task(harness.executor.run())
    try:
        client = harness.client
        sid = (await client.post("/api/chat/sessions")).json()["id"]
        await client.post(f"/api/chat/sessions/{sid}/turns", json={"message": "slow one"})
        for _ in range(200):  # the heartbeat (every 0.1 s here) checkpoints it
            session = (await client.get(f"/api/chat/sessions/{sid}")).json()
            if session["messages"][1]["content"]:
                break
            await asyncio.sleep(0.02)
        assistant = session["messages"][1]
        assert assistant["content"] == "Echo:" and assistant["status"] == "running"
        assert session["active_turn"]["status"] == "running"
        harness.runtime.gate.set()
        for _ in range(200):
            session = (await client.get(f"/api/chat/sessions/{sid}")).json()
            if session["active_turn"] is None:
                break
            await asyncio.sleep(0.02)
        assert session["messages"][1]["content"] == "Echo: slow one"
    finally:
        harness.executor.stop()
        await task
        await harness.client.aclose()
        await harness.store.shutdown()


async def test_delete_deletes_the_sessions_transcripts_only(h: Harness) -> None:
    sid = (await h.client.post("/api/chat/sessions")).json()["id"]
    other = (await h.client.post("/api/chat/sessions")).json()["id"]
    user = (await h.client.get(f"/api/chat/sessions/{sid}")).json()["user_id"]
    key: SessionKey = {"project_key": "p", "session_id": str(uuid.uuid4())}
    for session in (sid, other):
        store = TranscriptStore(h.objects, user_id=user, session_id=session, seq=1, attempt=1)
        await store.append(key, [{"type": "user", "uuid": "u"}])
    assert (await h.client.delete(f"/api/chat/sessions/{sid}")).status_code == 204
    assert await h.objects.list(session_prefix(user, sid)) == []
    assert len(await h.objects.list(session_prefix(user, other))) == 1


async def test_delete_starts_none_of_the_queued_turns(h: Harness) -> None:
    sid = (await h.client.post("/api/chat/sessions")).json()["id"]
    await h.client.post(f"/api/chat/sessions/{sid}/turns", json={"message": "slow head"})
    for text in ("queued one", "queued two"):
        await h.client.post(f"/api/chat/sessions/{sid}/turns", json={"message": text})
    for _ in range(200):
        if h.runtime.contexts:
            break
        await asyncio.sleep(0.01)
    assert (await h.client.delete(f"/api/chat/sessions/{sid}")).status_code == 204
    for _ in range(20):  # give a wrongly dispatched turn every chance to start
        await asyncio.sleep(0.02)
    assert [c.user_text for c in h.runtime.contexts] == ["slow head"]
    assert (await h.client.get(f"/api/chat/sessions/{sid}")).status_code == 404


async def test_a_turn_whose_rows_were_deleted_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel broadcast was missed and delete gave up waiting: once the rows
    are gone the executor's heartbeat stops the run instead of letting it go on."""
    from turnrelay.api import control

    monkeypatch.setattr(control, "CANCEL_WAIT", 0.2)
    harness = Harness(tmp_path)
    harness.settings = harness.settings.model_copy(update={"lease_ttl": 1.5})
    harness.executor.runner.settings = harness.settings

    async def missed(turn_id: str) -> None:
        return None  # the executor's cancel queue never sees it

    harness.queue.publish_cancel = missed  # type: ignore[method-assign]
    await migrate(harness.settings.database_url)
    await harness.store.startup()
    task = asyncio.create_task(harness.executor.run())
    try:
        client = harness.client
        sid = (await client.post("/api/chat/sessions")).json()["id"]
        r = await client.post(f"/api/chat/sessions/{sid}/turns", json={"message": "slow one"})
        turn_id = r.json()["turn_id"]
        for _ in range(200):
            if harness.runtime.contexts:
                break
            await asyncio.sleep(0.01)
        assert (await client.delete(f"/api/chat/sessions/{sid}")).status_code == 204
        for _ in range(300):  # the next heartbeat (every 0.5 s) finds the turn gone
            if harness.runtime.stopped:
                break
            await asyncio.sleep(0.01)
        assert harness.runtime.stopped == [turn_id]
        assert len(harness.executor.running) == 0
    finally:
        harness.executor.stop()
        await task
        await harness.client.aclose()
        await harness.store.shutdown()


async def test_heads_waiting_while_slots_are_free_are_all_admitted_at_once(
    tmp_path: Path,
) -> None:
    # Two heads wait while all three slots are free (their dispatch was lost:
    # an executor died between a finish and the dispatch after it). The next
    # admission admits both, not one per finished turn; the sweeper is far off.
    harness = Harness(tmp_path, max_running_turns_per_user=3, sweep_interval=3600)
    await migrate(harness.settings.database_url)
    await harness.store.startup()
    await harness.queue.startup()
    task = asyncio.create_task(harness.executor.run())
    try:
        waiting = []
        for _ in range(2):
            s = await harness.store.create_session("local")
            turn = (await harness.store.submit_turn(new_turn(s.id, "slow one"))).turn
            assert not turn.dispatched
            waiting.append(turn)
        third = (await harness.client.post("/api/chat/sessions")).json()["id"]
        r = await harness.client.post(
            f"/api/chat/sessions/{third}/turns", json={"message": "quick"}
        )
        assert r.status_code == 202, r.text
        async with asyncio.timeout(10):
            while True:
                turns = [await harness.store.get_turn(t.id) for t in waiting]
                if all(t.status is TurnStatus.RUNNING for t in turns):
                    break
                await asyncio.sleep(0.02)
        harness.runtime.gate.set()
    finally:
        harness.executor.stop()
        await task
        await harness.client.aclose()
        await harness.store.shutdown()


def new_turn(session_id: str, text: str) -> NewTurn:
    """A turn submitted as a store client that never dispatches it."""
    return NewTurn(session_id=session_id, user_id="local", text=text, model="openai:fake")
