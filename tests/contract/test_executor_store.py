"""The executor's store port (``ExecutorStore``): one suite, run against the
direct store on SQLite and on PostgreSQL, and against the RPC client over a
real `turnrelay db-manager` process on PostgreSQL.

The test arranges its data (sessions, submitted turns) with the API's direct
store, and then drives the turn only through the port under test. The
db-manager serves one database to the whole module, so a test reads the
sweeper's queries (which see every session) for its own sessions only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import POSTGRES_URL, require_server
from tests.contract.conftest import pg_admin
from tests.procs import Proc, free_port, start
from turnrelay.errors import (
    ApprovalAlreadyAnswered,
    ApprovalNotFound,
    SessionNotFound,
    TurnNotFound,
    TurnNotWaiting,
)
from turnrelay.store.base import (
    Decision,
    ExecutorStore,
    Multitask,
    NewApproval,
    NewTurn,
    SessionRecord,
    TurnOutcome,
    TurnPause,
    TurnRecord,
    TurnStatus,
)
from turnrelay.store.migrate import migrate
from turnrelay.store.rpc_client import RpcExecutorStore
from turnrelay.store.sql import SqlChatStore

SECRET = "contract-secret-0123456789abcdef"
FAR = datetime(2100, 1, 1, tzinfo=UTC)


@dataclass
class DbManager:
    database_url: str
    proc: Proc


@pytest.fixture(scope="module")
def db_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DbManager]:
    """A migrated PostgreSQL database and a `turnrelay db-manager` serving it."""
    require_server("PostgreSQL", POSTGRES_URL, 5432)
    name = f"turnrelay_rpc_{uuid.uuid4().hex[:10]}"
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"

    async def create() -> None:
        admin = await pg_admin(POSTGRES_URL)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        await migrate(url)

    async def drop() -> None:
        admin = await pg_admin(POSTGRES_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(create())
    port = free_port()
    proc = start(
        "db-manager",
        ["db-manager", "--port", str(port)],
        env={
            "TURNRELAY_DATABASE_URL": url,
            "TURNRELAY_DATABASE_MANAGER_SECRET": SECRET,
            "TURNRELAY_DATABASE_MANAGER_POOL_SIZE": "4",
        },
        tmp=tmp_path_factory.mktemp("dbm"),
        health_url=f"http://127.0.0.1:{port}/ready",
    )
    proc.url = f"http://127.0.0.1:{port}"
    try:
        yield DbManager(url, proc)
    finally:
        proc.stop()
        asyncio.run(drop())


@pytest.fixture
def fresh_pg() -> Iterator[str]:
    """A fresh PostgreSQL database, migrated; its URL (a sync fixture, so the
    async ones below can take it whatever their parameter)."""
    require_server("PostgreSQL", POSTGRES_URL, 5432)
    name = f"turnrelay_test_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await pg_admin(POSTGRES_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def database(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str | None]:
    """``(database URL, db-manager URL or None)`` for the fixture's parameter."""
    if request.param == "rpc":
        manager: DbManager = request.getfixturevalue("db_manager")
        return manager.database_url, manager.proc.url
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/chat.db", None
    return request.getfixturevalue("fresh_pg"), None


@dataclass
class Stores:
    setup: SqlChatStore  # the API's direct store, to arrange data
    port: ExecutorStore  # the implementation under test


ALL = [
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("rpc", marks=pytest.mark.postgres),
]
SQL = ALL[:2]


@pytest.fixture
async def stores(database: tuple[str, str | None]) -> AsyncIterator[Stores]:
    url, manager_url = database
    port: ExecutorStore
    setup = SqlChatStore(url)
    if manager_url is not None:
        port = RpcExecutorStore(manager_url, secret=SECRET)
    else:
        await migrate(url)
        port = setup
    await setup.startup()
    await port.startup()
    try:
        yield Stores(setup, port)
    finally:
        await port.shutdown()
        await setup.shutdown()


# Each session has a user of its own: the module's shared database never
# reaches a per-user cap whatever ran before.
_owners: dict[str, str] = {}


async def new_session(db: SqlChatStore) -> SessionRecord:
    session = await db.create_session(f"u{uuid.uuid4().hex[:12]}")
    _owners[session.id] = session.user_id
    return session


def new(session_id: str, text: str = "hello") -> NewTurn:
    return NewTurn(session_id=session_id, user_id=_owners[session_id], text=text, model="fake:m")


def mine(turns: list[TurnRecord], *session_ids: str) -> list[str]:
    return [t.id for t in turns if t.session_id in session_ids]


@pytest.mark.parametrize("database", ALL, indirect=True)
async def test_ping_and_an_unknown_turn(stores: Stores) -> None:
    await stores.port.ping()
    with pytest.raises(TurnNotFound):
        await stores.port.get_turn(str(uuid.uuid4()))


@pytest.mark.parametrize("database", ALL, indirect=True)
async def test_the_cli_session_id_is_recorded_and_read_back(stores: Stores) -> None:
    db, port = stores.setup, stores.port
    s = await new_session(db)
    assert await port.cli_session(s.id) is None
    cli = str(uuid.uuid4())
    await port.set_cli_session(s.id, cli)
    assert await port.cli_session(s.id) == cli
    assert (await db.get_session(s.id, s.user_id)).cli_session_id == cli
    missing = str(uuid.uuid4())
    with pytest.raises(SessionNotFound):
        await port.cli_session(missing)
    with pytest.raises(SessionNotFound):
        await port.set_cli_session(missing, cli)


@pytest.mark.parametrize("database", ALL, indirect=True)
async def test_dispatch_next_one_at_a_time_in_order(stores: Stores) -> None:
    db, port = stores.setup, stores.port
    s = await new_session(db)
    assert await port.dispatch_next(s.id) is None
    a = (await db.submit_turn(new(s.id, "a"))).turn
    b = (await db.submit_turn(new(s.id, "b"))).turn
    first = await port.dispatch_next(s.id)
    assert first is not None and first.id == a.id and first.dispatched
    assert first.user_text == "a" and first.created_at.tzinfo is not None
    assert await port.dispatch_next(s.id) is None  # a is in flight
    started = await port.start_turn(a.id, 0)
    assert started is not None and (started.status, started.attempt) == (TurnStatus.RUNNING, 1)
    assert await port.dispatch_next(s.id) is None  # a is running
    assert await port.finish_turn(a.id, 1, TurnOutcome(TurnStatus.COMPLETED, "done"))
    second = await port.dispatch_next(s.id)
    assert second is not None and second.id == b.id


@pytest.mark.parametrize("database", ALL, indirect=True)
async def test_the_publish_outbox_and_the_sweepers_queries(stores: Stores) -> None:
    db, port = stores.setup, stores.port
    waiting = await new_session(db)
    w1 = (await db.submit_turn(new(waiting.id, "w1"))).turn
    await db.submit_turn(new(waiting.id, "w2"))
    flying = await new_session(db)
    f1 = (await db.submit_turn(new(flying.id, "f1"))).turn
    head = await port.dispatch_next(flying.id)
    assert head is not None and head.id == f1.id
    ours = (waiting.id, flying.id)
    assert mine(await port.undispatched_heads(limit=5000), *ours) == [w1.id]
    assert mine(await port.dispatched_active(limit=5000), *ours) == [f1.id]
    # not confirmed: handed out again, but only once older than the cutoff
    assert mine(await port.unpublished_heads(FAR, limit=5000), *ours) == [f1.id]
    assert mine(await port.unpublished_heads(head.created_at, limit=5000), *ours) == []
    assert await port.dispatch_next(flying.id, republish_before=head.created_at) is None
    again = await port.dispatch_next(flying.id, republish_before=FAR)
    assert again is not None and again.id == f1.id
    # confirmed: left alone however long it waits
    await port.mark_published(f1.id)
    await port.mark_published(f1.id)  # a second confirm changes nothing
    assert mine(await port.unpublished_heads(FAR, limit=5000), *ours) == []
    assert await port.dispatch_next(flying.id, republish_before=FAR) is None
    await port.start_turn(f1.id, 0)
    assert mine(await port.dispatched_active(limit=5000, running_only=True), *ours) == [f1.id]


@pytest.mark.parametrize("database", ALL, indirect=True)
async def test_start_turn_is_a_cas_on_the_attempt(stores: Stores) -> None:
    db, port = stores.setup, stores.port
    s = await new_session(db)
    t = (await db.submit_turn(new(s.id))).turn
    assert await port.start_turn(t.id, 1) is None
    started = await port.start_turn(t.id, 0)
    assert started is not None and started.attempt == 1 and started.started_at is not None
    assert await port.start_turn(t.id, 0) is None  # a stale attempt
    retried = await port.start_turn(t.id, 1)  # a retry after a lapsed lease
    assert retried is not None and retried.attempt == 2
    assert await port.finish_turn(t.id, 2, TurnOutcome(TurnStatus.COMPLETED))
    assert await port.start_turn(t.id, 2) is None  # terminal
    assert await port.start_turn(str(uuid.uuid4()), 0) is None


@pytest.mark.parametrize("database", ALL, indirect=True)
async def test_checkpoints_are_fenced_and_the_finish_persists(stores: Stores) -> None:
    db, port = stores.setup, stores.port
    s = await new_session(db)
    t = (await db.submit_turn(new(s.id))).turn
    parts = [{"type": "text", "text": "par"}]
    assert not await port.save_partial(t.id, 0, "par", parts)  # queued, not running
    await port.start_turn(t.id, 0)
    assert not await port.save_partial(t.id, 0, "par", parts)  # a stale attempt
    assert await port.save_partial(t.id, 1, "par", parts)
    assert (await db.messages(s.id))[1].parts == parts
    outcome = TurnOutcome(
        TurnStatus.FAILED, content="partial", parts=parts, error="model down", usage={"in": 3}
    )
    assert not await port.finish_turn(t.id, 0, outcome)  # a stale attempt
    assert await port.finish_turn(t.id, 1, outcome)
    assert not await port.finish_turn(t.id, 1, TurnOutcome(TurnStatus.COMPLETED))
    assert not await port.save_partial(t.id, 1, "late", [])
    done = await port.get_turn(t.id)
    assert (done.status, done.error, done.usage) == (TurnStatus.FAILED, "model down", {"in": 3})
    assert done.finished_at is not None
    assert (await db.messages(s.id))[1].content == "partial"
    assert not await port.finish_turn(str(uuid.uuid4()), 1, outcome)


@pytest.mark.parametrize("database", ALL, indirect=True)
async def test_history_is_earlier_turns_in_order_non_empty_only(stores: Stores) -> None:
    db, port = stores.setup, stores.port
    s = await new_session(db)
    for text in ("one", "two"):
        t = (await db.submit_turn(new(s.id, text))).turn
        await port.dispatch_next(s.id)
        await port.start_turn(t.id, 0)
        await port.finish_turn(t.id, 1, TurnOutcome(TurnStatus.COMPLETED, content=f"re {text}"))
    third = (await db.submit_turn(new(s.id, "three"))).turn
    history = await port.history(s.id, third.seq)
    assert [(m.role, m.content) for m in history] == [
        ("user", "one"),
        ("assistant", "re one"),
        ("user", "two"),
        ("assistant", "re two"),
    ]
    assert all(m.created_at.tzinfo is not None for m in history)
    assert await port.history(s.id, 1) == []


@pytest.mark.parametrize("database", ALL, indirect=True)
async def test_a_cancel_flag_is_seen_through_the_port(stores: Stores) -> None:
    db, port = stores.setup, stores.port
    s = await new_session(db)
    t = (await db.submit_turn(new(s.id))).turn
    await db.request_cancel(t.id)
    assert (await port.get_turn(t.id)).cancel_requested


@pytest.mark.parametrize("database", ALL, indirect=True)
async def test_one_finish_wins_among_racing_ones(stores: Stores) -> None:
    db, port = stores.setup, stores.port
    s = await new_session(db)
    t = (await db.submit_turn(new(s.id))).turn
    await port.start_turn(t.id, 0)
    statuses = [TurnStatus.COMPLETED, TurnStatus.FAILED, TurnStatus.CANCELLED] * 2
    wins = await asyncio.gather(
        *(
            port.finish_turn(t.id, 1, TurnOutcome(status, content=f"by {i}"))
            for i, status in enumerate(statuses)
        )
    )
    assert wins.count(True) == 1
    winner = wins.index(True)
    assert (await port.get_turn(t.id)).status is statuses[winner]
    assert (await db.messages(s.id))[1].content == f"by {winner}"


@pytest.mark.parametrize("database", ALL, indirect=True)
async def test_racing_dispatches_hand_out_one_head(stores: Stores) -> None:
    db, port = stores.setup, stores.port
    s = await new_session(db)
    for i in range(3):
        await db.submit_turn(new(s.id, f"m{i}"))
    heads = await asyncio.gather(*(port.dispatch_next(s.id) for _ in range(6)))
    assert len([h for h in heads if h is not None]) == 1
    assert len([t for t in await db.active_turns(s.id) if t.dispatched]) == 1


@pytest.mark.parametrize("database", ALL, indirect=True)
async def test_a_freed_slot_goes_to_the_users_oldest_waiting_head(stores: Stores) -> None:
    db, port = stores.setup, stores.port
    user = f"u{uuid.uuid4().hex[:12]}"
    sessions_ = [await db.create_session(user) for _ in range(4)]
    turns_ = []
    for s in sessions_:
        _owners[s.id] = user
        submitted = await db.submit_turn(
            NewTurn(
                session_id=s.id,
                user_id=user,
                text="hi",
                model="fake:m",
                max_running_per_user=1,
                dispatch_if_idle=True,
            )
        )
        turns_.append(submitted.turn)
    assert [t.dispatched for t in turns_] == [True, False, False, False]
    assert await port.dispatch_next(sessions_[0].id, max_running_per_user=1) is None
    assert await port.start_turn(turns_[0].id, 0) is not None
    assert await port.finish_turn(turns_[0].id, 1, TurnOutcome(TurnStatus.COMPLETED))
    # Racing dispatchers (any of the user's sessions) admit exactly one: the oldest.
    heads = await asyncio.gather(
        *(port.dispatch_next(s.id, max_running_per_user=1) for s in sessions_ * 2)
    )
    admitted = [h.id for h in heads if h is not None]
    assert admitted == [turns_[1].id]
    assert await db.queue_position(await db.get_turn(turns_[2].id)) == 1


# call ids: a repeated write answers what the first one did (the direct store) -----------


@pytest.fixture
async def sql(database: tuple[str, str | None]) -> AsyncIterator[SqlChatStore]:
    url, _ = database
    await migrate(url)
    store = SqlChatStore(url)
    await store.startup()
    try:
        yield store
    finally:
        await store.shutdown()


@pytest.mark.parametrize("database", SQL, indirect=True)
async def test_a_repeated_call_answers_as_the_first(sql: SqlChatStore) -> None:
    s = await new_session(sql)
    t = (await sql.submit_turn(new(s.id))).turn
    head = await sql.dispatch_next(s.id, call_id="dispatch-0000000001")
    again = await sql.dispatch_next(s.id, call_id="dispatch-0000000001")
    assert head is not None and again == head  # not None: the head is not lost
    assert await sql.dispatch_next(s.id, call_id="dispatch-0000000002") is None
    started = await sql.start_turn(t.id, 0, call_id="start-000000000001")
    assert started is not None and started.attempt == 1
    assert await sql.start_turn(t.id, 0, call_id="start-000000000001") == started
    assert await sql.start_turn(t.id, 0, call_id="start-000000000002") is None
    assert (await sql.get_turn(t.id)).attempt == 1  # ran once
    assert await sql.save_partial(t.id, 1, "a", [], call_id="save-0000000000001")
    assert await sql.save_partial(t.id, 1, "b", [], call_id="save-0000000000002")
    # a late copy of the first checkpoint never overwrites the second
    assert await sql.save_partial(t.id, 1, "a", [], call_id="save-0000000000001")
    assert (await sql.messages(s.id))[1].content == "b"
    done = TurnOutcome(TurnStatus.COMPLETED, content="done")
    assert await sql.finish_turn(t.id, 1, done, call_id="finish-00000000001")
    assert await sql.finish_turn(t.id, 1, done, call_id="finish-00000000001")  # "won"
    assert not await sql.finish_turn(t.id, 1, done, call_id="finish-00000000002")
    await sql.mark_published(t.id, call_id="publish-0000000001")
    await sql.mark_published(t.id, call_id="publish-0000000001")


@pytest.mark.parametrize("database", SQL, indirect=True)
async def test_racing_copies_of_one_call_run_it_once(sql: SqlChatStore) -> None:
    s = await new_session(sql)
    t = (await sql.submit_turn(new(s.id))).turn
    await sql.start_turn(t.id, 0)
    outcome = TurnOutcome(TurnStatus.COMPLETED, content="once")
    copies = await asyncio.gather(
        *(sql.finish_turn(t.id, 1, outcome, call_id="finish-racing-0001") for _ in range(5))
    )
    assert copies == [True] * 5
    assert not await sql.finish_turn(t.id, 1, outcome, call_id="finish-racing-0002")


@pytest.mark.parametrize("database", SQL, indirect=True)
async def test_recorded_calls_are_pruned(sql: SqlChatStore) -> None:
    s = await new_session(sql)
    t = (await sql.submit_turn(new(s.id))).turn
    await sql.start_turn(t.id, 0, call_id="start-to-be-pruned")
    assert await sql.prune_calls(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert await sql.prune_calls(datetime.now(UTC) + timedelta(seconds=1)) == 1
    # forgotten: the same id is a new call now (and loses its CAS)
    assert await sql.start_turn(t.id, 0, call_id="start-to-be-pruned") is None


def _pause(attempt: int, ids: list[str]) -> TurnPause:
    parts = [{"type": "tool-save_note", "toolCallId": "c1", "state": "approval-requested"}]
    return TurnPause(attempt, 7, {"messages": [{"role": "user"}]}, "so far", parts, ids)


@pytest.mark.parametrize("database", ALL, indirect=True)
async def test_a_pause_waits_for_every_answer_and_the_last_one_resumes(stores: Stores) -> None:
    db, port = stores.setup, stores.port
    s = await new_session(db)
    t = (await db.submit_turn(new(s.id))).turn
    await port.start_turn(t.id, 0)
    a1, a2 = f"approval_{uuid.uuid4().hex}", f"approval_{uuid.uuid4().hex}"
    asks = [NewApproval(a1, "c1", "save_note", {"text": "x"}), NewApproval(a2, "c2", "rm", None)]
    later = datetime.now(UTC) + timedelta(minutes=5)
    assert not await port.pause_turn(t.id, 0, _pause(0, [a1, a2]), asks, later)  # stale attempt
    assert await port.pause_turn(t.id, 1, _pause(1, [a1, a2]), asks, later)
    waiting = await port.get_turn(t.id)
    assert waiting.waiting and not waiting.resumable and waiting.pending_approvals == 2
    assert waiting.paused == _pause(1, [a1, a2])
    assert (await db.messages(s.id))[1].content == "so far"
    assert [a.approved for a in await port.approvals(t.id)] == [None, None]

    first = await db.answer_approvals(t.id, [Decision(a1, True)])
    assert not first.resume and first.turn.waiting
    with pytest.raises(ApprovalAlreadyAnswered):
        await db.answer_approvals(t.id, [Decision(a1, False)])
    with pytest.raises(ApprovalNotFound):
        await db.answer_approvals(t.id, [Decision("approval_other", True)])
    again = await db.answer_approvals(t.id, [Decision(a1, True)])  # a repeat: no change
    assert not again.resume
    last = await db.answer_approvals(t.id, [Decision(a2, False, "no")])
    assert last.resume and last.turn.resumable
    assert [(a.approved, a.reason) for a in last.approvals] == [(True, None), (False, "no")]
    assert not (await db.answer_approvals(t.id, [Decision(a2, False, "no")])).resume
    # The continuing attempt: the pause stays (a retry continues from it too).
    resumed = await port.start_turn(t.id, 1)
    assert resumed is not None and resumed.attempt == 2 and resumed.paused is not None
    assert not resumed.waiting and not resumed.resumable


@pytest.mark.parametrize("database", ALL, indirect=True)
async def test_a_cancel_asked_first_refuses_the_pause(stores: Stores) -> None:
    db, port = stores.setup, stores.port
    s = await new_session(db)
    t = (await db.submit_turn(new(s.id))).turn
    await port.start_turn(t.id, 0)
    await db.request_cancel(t.id)
    a = f"approval_{uuid.uuid4().hex}"
    ask = [NewApproval(a, "c1", "save_note", {})]
    later = datetime.now(UTC) + timedelta(minutes=5)
    assert not await port.pause_turn(t.id, 1, _pause(1, [a]), ask, later)
    assert not (await port.get_turn(t.id)).waiting
    with pytest.raises(TurnNotWaiting):
        await db.answer_approvals(t.id, [Decision(a, True)])


@pytest.mark.parametrize("database", ALL, indirect=True)
async def test_expired_requests_are_denied_once_and_resume_their_turn(stores: Stores) -> None:
    db, port = stores.setup, stores.port
    s = await new_session(db)
    t = (await db.submit_turn(new(s.id))).turn
    await port.start_turn(t.id, 0)
    a = f"approval_{uuid.uuid4().hex}"
    soon = datetime.now(UTC) + timedelta(seconds=1)
    assert await port.pause_turn(t.id, 1, _pause(1, [a]), [NewApproval(a, "c", "x", {})], soon)
    assert mine(await port.expire_approvals(datetime.now(UTC), "late"), s.id) == []  # not yet
    after = datetime.now(UTC) + timedelta(seconds=2)
    assert mine(await port.expire_approvals(after, "late"), s.id) == [t.id]
    assert mine(await port.expire_approvals(after, "late"), s.id) == []  # once
    (decided,) = await port.approvals(t.id)
    assert (decided.approved, decided.reason) == (False, "late")
    assert (await port.get_turn(t.id)).resumable
    with pytest.raises(ApprovalAlreadyAnswered):
        await db.answer_approvals(t.id, [Decision(a, True)])
    # A turn cancelled while it waited: its requests close, nothing resumes.
    s2 = await new_session(db)
    u = (await db.submit_turn(new(s2.id))).turn
    await port.start_turn(u.id, 0)
    b = f"approval_{uuid.uuid4().hex}"
    assert await port.pause_turn(u.id, 1, _pause(1, [b]), [NewApproval(b, "c", "x", {})], soon)
    assert await port.finish_turn(u.id, 1, TurnOutcome(TurnStatus.CANCELLED))
    assert mine(await port.expire_approvals(after, "late"), s2.id) == []
    assert (await port.approvals(u.id))[0].approved is False
    with pytest.raises(TurnNotFound):
        await db.answer_approvals(str(uuid.uuid4()), [Decision(b, True)])


@pytest.mark.parametrize("database", ALL, indirect=True)
async def test_steers_are_taken_once_by_the_running_attempt_or_become_the_next_turn(
    stores: Stores,
) -> None:
    db, port = stores.setup, stores.port
    s = await new_session(db)
    running = (await db.submit_turn(new(s.id, "go"))).turn
    assert await port.dispatch_next(s.id) is not None
    await port.start_turn(running.id, 0)
    steer = NewTurn(s.id, _owners[s.id], "steer it", "fake:m", multitask=Multitask.STEER)
    plain = (await db.submit_turn(new(s.id, "plain"))).turn  # an enqueued turn stays
    a = (await db.submit_turn(steer)).turn
    assert await port.take_steers(running.id, 0, 1) == []  # a stale attempt takes none
    (taken,) = await port.take_steers(running.id, 1, 2)
    assert (taken.turn_id, taken.text, taken.step) == (a.id, "steer it", 2)
    b = (await db.submit_turn(dataclasses.replace(steer, text="and this"))).turn
    assert [(t.turn_id, t.step) for t in await port.take_steers(running.id, 1, 3)] == [
        (a.id, 2),
        (b.id, 3),
    ]
    done = await port.get_turn(a.id)
    assert (done.status, done.steered_into) == (TurnStatus.COMPLETED, running.id)
    assert (await port.get_turn(plain.id)).status is TurnStatus.QUEUED
    # A retry gets them again (it starts over); the messages list them as user entries.
    retried = await port.start_turn(running.id, 1)
    assert retried is not None
    assert [t.turn_id for t in await port.take_steers(running.id, 2, 1)] == [a.id, b.id]
    assert [(m.role, m.content) for m in await db.messages(s.id)] == [
        ("user", "go"),
        ("assistant", ""),
        ("user", "plain"),
        ("assistant", ""),
        ("user", "steer it"),
        ("user", "and this"),
    ]
    # Once the turn ended, a steer is just the next turn: nothing takes it.
    assert await port.finish_turn(running.id, 2, TurnOutcome(TurnStatus.COMPLETED))
    c = (await db.submit_turn(dataclasses.replace(steer, text="late"))).turn
    assert [t.turn_id for t in await port.take_steers(running.id, 2, 4)] == []
    assert (await port.get_turn(c.id)).status is TurnStatus.QUEUED


@pytest.mark.parametrize("database", [SQL[1]], indirect=True)
async def test_a_model_request_with_no_steer_to_take_does_not_wait_for_the_session_lock(
    stores: Stores, database: tuple[str, str | None]
) -> None:
    """Every model request asks for steers; almost always there are none. That
    answer is a read: it does not queue behind a submit (or anything else)
    holding the session's lock, as taking a steer must."""
    db, port = stores.setup, stores.port
    s = await new_session(db)
    running = (await db.submit_turn(new(s.id, "go"))).turn
    assert await port.dispatch_next(s.id) is not None
    await port.start_turn(running.id, 0)
    engine = create_async_engine(database[0])
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text("SELECT id FROM sessions WHERE id = :id FOR UPDATE"), {"id": s.id}
            )
            assert await asyncio.wait_for(port.take_steers(running.id, 1, 1), 10) == []
    finally:
        await engine.dispose()


@pytest.mark.parametrize("database", [SQL[0]], indirect=True)
async def test_a_finish_with_nothing_to_admit_does_not_wait_for_the_sqlite_writer(
    stores: Stores, database: tuple[str, str | None]
) -> None:
    """Every finish asks for the owner's next waiting head. On SQLite, with
    none waiting, the answer is a read: it does not queue behind another
    process's write transaction. With one waiting, it still admits it."""

    db, port = stores.setup, stores.port
    s = await new_session(db)
    other = await db.create_session(_owners[s.id])  # the same user's
    _owners[other.id] = other.user_id
    running = (await db.submit_turn(new(s.id, "go"))).turn
    assert await port.dispatch_next(s.id, max_running_per_user=5) is not None
    assert await port.start_turn(running.id, 0) is not None
    path = database[0].split(":///", 1)[1]
    blocker = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # holds the database's write lock
        got = await asyncio.wait_for(port.dispatch_next(s.id, max_running_per_user=5), 10)
        assert got is None
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # A head that is waiting is still admitted (the write path).
    waiting = (
        await db.submit_turn(dataclasses.replace(new(other.id), max_running_per_user=1))
    ).turn
    assert not waiting.dispatched
    assert await port.finish_turn(running.id, 1, TurnOutcome(TurnStatus.COMPLETED))
    head = await port.dispatch_next(s.id, max_running_per_user=5)
    assert head is not None and head.id == waiting.id
