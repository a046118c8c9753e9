"""ChatStore contract: one suite, run against SQLite (a temp file) and PostgreSQL
(a database of its own per test, created and dropped by the fixture)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from turnrelay.errors import (
    BackendUnavailable,
    MessageIdConflict,
    RateLimited,
    SchemaOutOfDate,
    SessionNotFound,
    TurnAlreadyActive,
    TurnNotFound,
)
from turnrelay.store import submit
from turnrelay.store.base import Multitask, NewTurn, TurnOutcome, TurnStatus
from turnrelay.store.migrate import migrate
from turnrelay.store.sql import SqlChatStore


class TickingClock:
    """Each reading is one millisecond after the previous: orderings are strict."""

    def __init__(self) -> None:
        self._now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self._now += timedelta(milliseconds=1)
        return self._now


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
    """The URL of an empty database of each dialect."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/nested/dir/chat.db"
    else:
        yield request.getfixturevalue("pg_database")


@pytest.fixture
async def url(empty_url: str) -> str:
    await migrate(empty_url)
    return empty_url


@pytest.fixture
async def store(url: str) -> AsyncIterator[SqlChatStore]:
    s = SqlChatStore(url, clock=TickingClock())
    await s.startup()
    try:
        yield s
    finally:
        await s.shutdown()


def new(session_id: str, text: str = "hello", user: str = "alice", **kw: object) -> NewTurn:
    return NewTurn(session_id=session_id, user_id=user, text=text, model="fake:m", **kw)  # type: ignore[arg-type]


async def run_turn(
    store: SqlChatStore, session_id: str, text: str = "hi", user: str = "alice"
) -> str:
    """Submit, dispatch, start and complete a turn; its id."""
    result = await store.submit_turn(new(session_id, text, user))
    await store.dispatch_next(session_id)
    started = await store.start_turn(result.turn.id, 0)
    assert started is not None
    outcome = TurnOutcome(TurnStatus.COMPLETED, content=f"re: {text}")
    assert await store.finish_turn(result.turn.id, 1, outcome)
    return result.turn.id


# sessions -----------------------------------------------------------------------------


async def test_create_and_get_session(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    assert uuid.UUID(s.id).version == 4
    assert s.user_id == "alice" and s.title is None and s.cli_session_id is None
    assert s.created_at.tzinfo is not None and s.created_at.utcoffset() == timedelta(0)
    assert await store.get_session(s.id, "alice") == s


async def test_foreign_session_is_indistinguishable_from_unknown(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    with pytest.raises(SessionNotFound):
        await store.get_session(s.id, "mallory")
    with pytest.raises(SessionNotFound):
        await store.get_session(str(uuid.uuid4()), "alice")
    with pytest.raises(SessionNotFound):
        await store.submit_turn(new(s.id, user="mallory"))
    with pytest.raises(SessionNotFound):
        await store.delete_session(s.id, "mallory")
    assert await store.messages(s.id) == []


async def test_list_sessions_newest_updated_first(store: SqlChatStore) -> None:
    a = await store.create_session("alice")
    b = await store.create_session("alice")
    c = await store.create_session("alice")
    await store.create_session("bob")
    await store.submit_turn(new(a.id))  # a becomes the most recently updated
    page, total = await store.list_sessions("alice", limit=2, offset=0)
    assert total == 3
    assert [s.id for s in page] == [a.id, c.id]
    page, total = await store.list_sessions("alice", limit=2, offset=2)
    assert [s.id for s in page] == [b.id] and total == 3


async def test_set_cli_session(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    await store.set_cli_session(s.id, "cli-123")
    assert (await store.get_session(s.id, "alice")).cli_session_id == "cli-123"
    with pytest.raises(SessionNotFound):
        await store.set_cli_session(str(uuid.uuid4()), "x")


async def test_delete_session_removes_turns_and_messages(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    other = await store.create_session("alice")
    turn_id = await run_turn(store, s.id)
    kept = await run_turn(store, other.id)
    await store.submit_turn(new(s.id, "queued one"))
    await store.delete_session(s.id, "alice")
    with pytest.raises(SessionNotFound):
        await store.get_session(s.id, "alice")
    with pytest.raises(TurnNotFound):
        await store.get_turn(turn_id)
    assert await store.messages(s.id) == []
    assert await store.active_turns(s.id) == []
    assert (await store.get_turn(kept)).status is TurnStatus.COMPLETED
    assert len(await store.messages(other.id)) == 2


# submit -----------------------------------------------------------------------------


async def test_submit_writes_queued_turn_and_both_messages(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    result = await store.submit_turn(new(s.id, "first line\nsecond line", client_message_id="m1"))
    t = result.turn
    assert result.created and result.earlier_active == []
    assert uuid.UUID(t.id).version == 4
    assert (t.seq, t.status, t.attempt, t.dispatched, t.cancel_requested) == (
        1,
        TurnStatus.QUEUED,
        0,
        False,
        False,
    )
    assert t.user_text == "first line\nsecond line" and t.client_message_id == "m1"
    assert t.model == "fake:m" and t.user_id == "alice" and t.session_id == s.id
    assert await store.get_turn(t.id) == t

    user, assistant = await store.messages(s.id)
    assert (user.id, user.role, user.content) == (t.user_message_id, "user", t.user_text)
    assert (assistant.id, assistant.role, assistant.content, assistant.parts) == (
        t.assistant_message_id,
        "assistant",
        "",
        [],
    )
    assert user.status is assistant.status is TurnStatus.QUEUED
    assert user.turn_id == assistant.turn_id == t.id

    session = await store.get_session(s.id, "alice")
    assert session.title == "first line"
    assert session.updated_at > s.updated_at


async def test_title_is_set_once_and_shortened(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    await store.submit_turn(new(s.id, "x" * 200))
    await store.submit_turn(new(s.id, "another title"))
    assert (await store.get_session(s.id, "alice")).title == "x" * 80


async def test_seq_increases_and_earlier_active_is_reported(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    first = await store.submit_turn(new(s.id, "one"))
    second = await store.submit_turn(new(s.id, "two", multitask=Multitask.INTERRUPT))
    third = await store.submit_turn(new(s.id, "three"))
    assert [first.turn.seq, second.turn.seq, third.turn.seq] == [1, 2, 3]
    assert second.earlier_active == [first.turn]
    assert [t.id for t in third.earlier_active] == [first.turn.id, second.turn.id]
    assert [t.id for t in await store.active_turns(s.id)] == [
        first.turn.id,
        second.turn.id,
        third.turn.id,
    ]


async def test_same_message_id_same_text_is_idempotent(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    first = await store.submit_turn(new(s.id, "hi", client_message_id="m1"))
    again = await store.submit_turn(new(s.id, "hi", client_message_id="m1"))
    assert not again.created and again.turn == first.turn
    # The same client id in another session is another message.
    other = await store.create_session("alice")
    assert (await store.submit_turn(new(other.id, "hi", client_message_id="m1"))).created
    assert len(await store.messages(s.id)) == 2


async def test_same_message_id_different_text_conflicts(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    await store.submit_turn(new(s.id, "hi", client_message_id="m1"))
    with pytest.raises(MessageIdConflict):
        await store.submit_turn(new(s.id, "something else", client_message_id="m1"))
    assert len(await store.messages(s.id)) == 2


async def test_idempotent_repeat_wins_over_reject_and_caps(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    first = await store.submit_turn(new(s.id, "hi", client_message_id="m1"))
    again = await store.submit_turn(
        new(
            s.id, "hi", client_message_id="m1", multitask=Multitask.REJECT, max_queued_per_session=1
        )
    )
    assert again.turn.id == first.turn.id and not again.created


async def test_reject_when_a_turn_is_active(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    head = await store.submit_turn(new(s.id, "one"))
    await store.submit_turn(new(s.id, "two"))
    with pytest.raises(TurnAlreadyActive) as info:
        await store.submit_turn(new(s.id, "three", multitask=Multitask.REJECT))
    assert info.value.turn_id == head.turn.id
    assert len(await store.active_turns(s.id)) == 2
    assert len(await store.messages(s.id)) == 4


async def test_reject_passes_when_nothing_is_active(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    await run_turn(store, s.id)
    result = await store.submit_turn(new(s.id, "next", multitask=Multitask.REJECT))
    assert result.created and result.turn.seq == 2


async def admitted(store: SqlChatStore, user: str = "alice", cap: int = 2) -> tuple:
    """A fresh session of ``user`` and its first turn, submitted as the API does."""
    s = await store.create_session(user)
    result = await store.submit_turn(
        new(s.id, user=user, max_running_per_user=cap, dispatch_if_idle=True)
    )
    return s, result.turn


async def test_heads_beyond_the_running_cap_wait_in_the_users_fifo(store: SqlChatStore) -> None:
    (s1, t1), (_, t2), (s3, t3), (s4, t4) = [await admitted(store) for _ in range(4)]
    assert (t1.dispatched, t2.dispatched, t3.dispatched, t4.dispatched) == (
        True,
        True,
        False,
        False,
    )
    assert [await store.queue_position(t) for t in (t1, t2, t3, t4)] == [None, None, 1, 2]
    assert await store.count_running_for_user("alice") == 2
    assert (await store.oldest_waiting("alice")).id == t3.id  # type: ignore[union-attr]
    # Another user is not held up by alice's backlog.
    _, bob = await admitted(store, user="bob")
    assert bob.dispatched
    # While both slots are taken nothing more is admitted.
    assert await store.dispatch_next(s3.id, max_running_per_user=2) is None
    # A turn queued behind s1's running turn is not in the FIFO until it is s1's head.
    later = (await store.submit_turn(new(s1.id, "later", max_running_per_user=2))).turn
    assert await store.queue_position(later) is None
    # t1 ends: its slot goes to the oldest waiting head of any of alice's
    # sessions (t3), not to the next turn of t1's own session.
    assert await store.start_turn(t1.id, 0) is not None
    assert await store.finish_turn(t1.id, 1, TurnOutcome(TurnStatus.COMPLETED))
    admitted_next = await store.dispatch_next(s1.id, max_running_per_user=2)
    assert admitted_next is not None and admitted_next.id == t3.id
    assert admitted_next.dispatched and (await store.get_turn(t3.id)).dispatched
    # s1's "later" is now a head: it waits behind t4 (older), FIFO across sessions.
    assert await store.queue_position(t4) == 1
    assert await store.queue_position(later) == 2
    assert await store.dispatch_next(s4.id, max_running_per_user=2) is None
    # Without a cap, dispatch keeps its per-session meaning.
    assert (await store.dispatch_next(s1.id)).id == later.id  # type: ignore[union-attr]


async def test_a_new_head_never_jumps_the_fifo(store: SqlChatStore) -> None:
    _, t1 = await admitted(store, cap=1)
    _, t2 = await admitted(store, cap=1)
    assert await store.start_turn(t1.id, 0) is not None
    assert await store.finish_turn(t1.id, 1, TurnOutcome(TurnStatus.COMPLETED))
    # A slot is free, but t2 has waited longer than the next submit.
    _, t3 = await admitted(store, cap=1)
    assert not t3.dispatched
    assert [await store.queue_position(t) for t in (t2, t3)] == [1, 2]


async def test_a_burst_is_not_held_up_by_a_head_between_turns(store: SqlChatStore) -> None:
    # A session's next turn is a waiting head from its previous turn's finish
    # until the dispatch after it (an RPC round trip apart via the db-manager).
    # Submits in that moment must not queue behind it while slots are free:
    # seen in CI, 20 of them filled the FIFO, and the next got 429 with 99 of
    # 100 slots free.
    s = await store.create_session("alice")
    caps = {"max_running_per_user": 100, "max_waiting_per_user": 20, "dispatch_if_idle": True}
    first = (await store.submit_turn(new(s.id, "one", **caps))).turn
    second = (await store.submit_turn(new(s.id, "two", **caps))).turn
    assert await store.start_turn(first.id, 0) is not None
    assert await store.finish_turn(first.id, 1, TurnOutcome(TurnStatus.COMPLETED))
    assert await store.queue_position(second) == 1  # not admitted yet
    fresh = [await store.create_session("alice") for _ in range(25)]
    results = await asyncio.gather(*(store.submit_turn(new(f.id, **caps)) for f in fresh))
    assert all(r.turn.dispatched for r in results)
    assert await store.count_running_for_user("alice") == 25
    # The head between turns still goes first once slots are short.
    assert (await store.dispatch_next(s.id, max_running_per_user=100)).id == second.id  # type: ignore[union-attr]


async def test_a_cancelled_waiting_head_leaves_the_fifo(store: SqlChatStore) -> None:
    _, t1 = await admitted(store, cap=1)
    s2, t2 = await admitted(store, cap=1)
    _, t3 = await admitted(store, cap=1)
    assert await store.finish_turn(t2.id, 0, TurnOutcome(TurnStatus.CANCELLED))
    assert await store.queue_position(t3) == 1
    assert await store.start_turn(t1.id, 0) is not None
    assert await store.finish_turn(t1.id, 1, TurnOutcome(TurnStatus.COMPLETED))
    assert (await store.dispatch_next(s2.id, max_running_per_user=1)).id == t3.id  # type: ignore[union-attr]


async def test_beyond_the_waiting_cap_429(store: SqlChatStore) -> None:
    for _ in range(3):
        await admitted(store, cap=1)  # one running, two waiting
    fresh = await store.create_session("alice")
    with pytest.raises(RateLimited, match="waiting") as caught:
        await store.submit_turn(
            new(fresh.id, max_running_per_user=1, max_waiting_per_user=2, dispatch_if_idle=True)
        )
    assert caught.value.code == "too_many_waiting" and caught.value.retry_after > 0
    assert await store.messages(fresh.id) == []
    assert (await store.get_session(fresh.id, "alice")).title is None
    # With the FIFO off (0 waiting), the running cap is a hard 429.
    with pytest.raises(RateLimited):
        await store.submit_turn(
            new(fresh.id, max_running_per_user=1, max_waiting_per_user=0, dispatch_if_idle=True)
        )


async def test_queued_cap_per_session(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    one = (await store.submit_turn(new(s.id, "one"))).turn
    await store.dispatch_next(s.id)
    await store.start_turn(one.id, 0)  # running turns do not count as queued
    second = await store.submit_turn(new(s.id, "two", max_queued_per_session=2))
    await store.submit_turn(new(s.id, "three", max_queued_per_session=2))
    with pytest.raises(RateLimited, match="queued"):
        await store.submit_turn(new(s.id, "four", max_queued_per_session=2))
    assert len(await store.active_turns(s.id)) == 3
    assert len(await store.messages(s.id)) == 6
    assert second.turn.seq == 2


# dispatch ----------------------------------------------------------------------------


async def test_dispatch_next_one_at_a_time_in_order(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    assert await store.dispatch_next(s.id) is None
    a = (await store.submit_turn(new(s.id, "a"))).turn
    b = (await store.submit_turn(new(s.id, "b"))).turn
    first = await store.dispatch_next(s.id)
    assert first is not None and first.id == a.id and first.dispatched
    assert (await store.get_turn(a.id)).dispatched
    assert await store.dispatch_next(s.id) is None  # a is in flight
    assert await store.start_turn(a.id, 0) is not None
    assert await store.dispatch_next(s.id) is None  # a is running
    assert await store.finish_turn(a.id, 1, TurnOutcome(TurnStatus.COMPLETED, "done"))
    second = await store.dispatch_next(s.id)
    assert second is not None and second.id == b.id
    assert await store.dispatch_next(str(uuid.uuid4())) is None


async def test_undispatched_heads(store: SqlChatStore) -> None:
    waiting = await store.create_session("alice")
    w1 = (await store.submit_turn(new(waiting.id, "w1"))).turn
    await store.submit_turn(new(waiting.id, "w2"))
    in_flight = await store.create_session("alice")
    await store.submit_turn(new(in_flight.id, "f1"))
    await store.dispatch_next(in_flight.id)
    await store.submit_turn(new(in_flight.id, "f2"))
    finished = await store.create_session("bob")
    await run_turn(store, finished.id, user="bob")
    assert [t.id for t in await store.undispatched_heads()] == [w1.id]
    assert await store.undispatched_heads(limit=0) == []
    assert [t.session_id for t in await store.dispatched_active()] == [in_flight.id]


async def test_an_unconfirmed_head_is_republished_and_a_confirmed_one_never(
    store: SqlChatStore,
) -> None:
    """The publish outbox: a backlog waiting in the broker is left alone, a head
    whose publisher died before the broker's confirm is handed out again."""
    clock = TickingClock()
    s = await store.create_session("alice")
    a = (await store.submit_turn(new(s.id, "a"))).turn
    head = await store.dispatch_next(s.id)
    assert head is not None and head.id == a.id
    later = clock() + timedelta(days=3650)  # any time after the dispatch
    # not confirmed: republished, but only once it is older than the cutoff
    assert await store.dispatch_next(s.id, republish_before=head.created_at) is None
    again = await store.dispatch_next(s.id, republish_before=later)
    assert again is not None and again.id == a.id
    assert [t.id for t in await store.unpublished_heads(later)] == [a.id]
    assert await store.unpublished_heads(head.created_at) == []
    # confirmed: left alone, however long it waits in the broker
    await store.mark_published(a.id)
    assert await store.dispatch_next(s.id, republish_before=later) is None
    assert await store.unpublished_heads(later) == []
    # a running head is never republished from here (the lease rules cover it)
    b_session = await store.create_session("alice")
    b = (await store.submit_turn(new(b_session.id, "b"))).turn
    await store.dispatch_next(b_session.id)
    await store.start_turn(b.id, 0)
    assert await store.dispatch_next(b_session.id, republish_before=later) is None
    assert await store.unpublished_heads(later) == []
    running = await store.dispatched_active(running_only=True)
    assert [t.id for t in running] == [b.id]


async def test_submit_to_an_idle_session_dispatches_unconfirmed(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    t = (await store.submit_turn(new(s.id, "a", dispatch_if_idle=True))).turn
    assert t.dispatched
    far = datetime(2100, 1, 1, tzinfo=UTC)
    assert [h.id for h in await store.unpublished_heads(far)] == [t.id]
    await store.mark_published(t.id)
    assert await store.unpublished_heads(far) == []


async def test_count_running_for_user(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    assert await store.count_running_for_user("alice") == 0
    t = (await store.submit_turn(new(s.id))).turn
    assert await store.count_running_for_user("alice") == 0  # waiting, not admitted
    await store.dispatch_next(s.id)
    assert await store.count_running_for_user("alice") == 1
    await store.start_turn(t.id, 0)
    assert await store.count_running_for_user("alice") == 1
    await store.finish_turn(t.id, 1, TurnOutcome(TurnStatus.FAILED, error="boom"))
    assert await store.count_running_for_user("alice") == 0


# CAS ------------------------------------------------------------------------------------


async def test_start_turn_cas(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    t = (await store.submit_turn(new(s.id))).turn
    assert await store.start_turn(t.id, 1) is None
    started = await store.start_turn(t.id, 0)
    assert started is not None
    assert (started.status, started.attempt) == (TurnStatus.RUNNING, 1)
    assert started.started_at is not None and started.started_at.tzinfo is not None
    assert await store.start_turn(t.id, 0) is None  # stale attempt
    retried = await store.start_turn(t.id, 1)  # a retry after a lapsed lease
    assert retried is not None and retried.attempt == 2
    assert await store.finish_turn(t.id, 2, TurnOutcome(TurnStatus.COMPLETED))
    assert await store.start_turn(t.id, 2) is None  # terminal
    assert await store.start_turn(str(uuid.uuid4()), 0) is None


async def test_finish_turn_cas_and_persisted_outcome(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    t = (await store.submit_turn(new(s.id))).turn
    await store.start_turn(t.id, 0)
    before = await store.get_session(s.id, "alice")
    parts = [{"type": "text", "text": "answer"}]
    outcome = TurnOutcome(
        TurnStatus.FAILED, content="answer", parts=parts, error="model down", usage={"in": 3}
    )
    assert not await store.finish_turn(t.id, 0, outcome)  # stale attempt
    assert await store.finish_turn(t.id, 1, outcome)
    assert not await store.finish_turn(t.id, 1, TurnOutcome(TurnStatus.COMPLETED))
    done = await store.get_turn(t.id)
    assert (done.status, done.error, done.usage) == (TurnStatus.FAILED, "model down", {"in": 3})
    assert done.finished_at is not None
    user, assistant = await store.messages(s.id)
    assert (assistant.content, assistant.parts, assistant.status) == (
        "answer",
        parts,
        TurnStatus.FAILED,
    )
    assert user.status is TurnStatus.FAILED
    assert (await store.get_session(s.id, "alice")).updated_at > before.updated_at
    assert not await store.finish_turn(str(uuid.uuid4()), 1, outcome)


async def test_finish_a_queued_turn_as_cancelled(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    t = (await store.submit_turn(new(s.id))).turn
    assert await store.finish_turn(t.id, 0, TurnOutcome(TurnStatus.CANCELLED))
    assert (await store.get_turn(t.id)).status is TurnStatus.CANCELLED
    assert await store.start_turn(t.id, 0) is None
    assert await store.dispatch_next(s.id) is None


async def test_save_partial_is_fenced(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    t = (await store.submit_turn(new(s.id))).turn
    parts = [{"type": "text", "text": "par"}]
    assert not await store.save_partial(t.id, 0, "par", parts)  # queued, not running
    await store.start_turn(t.id, 0)
    assert not await store.save_partial(t.id, 0, "par", parts)  # stale attempt
    assert await store.save_partial(t.id, 1, "par", parts)
    assert (await store.messages(s.id))[1].content == "par"
    assert (await store.messages(s.id))[1].parts == parts
    await store.finish_turn(t.id, 1, TurnOutcome(TurnStatus.CANCELLED, content="partial"))
    assert not await store.save_partial(t.id, 1, "late", [])
    assert (await store.messages(s.id))[1].content == "partial"


async def test_request_cancel(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    t = (await store.submit_turn(new(s.id))).turn
    flagged = await store.request_cancel(t.id)
    assert flagged.cancel_requested and flagged.status is TurnStatus.QUEUED
    assert (await store.get_turn(t.id)).cancel_requested
    with pytest.raises(TurnNotFound):
        await store.request_cancel(str(uuid.uuid4()))
    with pytest.raises(TurnNotFound):
        await store.get_turn(str(uuid.uuid4()))


# messages -------------------------------------------------------------------------------


async def test_messages_and_history(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    await run_turn(store, s.id, "one")
    empty = (await store.submit_turn(new(s.id, "two"))).turn
    await store.start_turn(empty.id, 0)
    await store.finish_turn(empty.id, 1, TurnOutcome(TurnStatus.FAILED, error="x"))
    current = (await store.submit_turn(new(s.id, "three"))).turn

    entries = await store.messages(s.id)
    assert [(m.role, m.content) for m in entries] == [
        ("user", "one"),
        ("assistant", "re: one"),
        ("user", "two"),
        ("assistant", ""),
        ("user", "three"),
        ("assistant", ""),
    ]
    assert [m.status for m in entries[::2]] == [
        TurnStatus.COMPLETED,
        TurnStatus.FAILED,
        TurnStatus.QUEUED,
    ]
    history = await store.history(s.id, before_seq=current.seq)
    assert [(m.role, m.content) for m in history] == [
        ("user", "one"),
        ("assistant", "re: one"),
        ("user", "two"),
    ]
    assert await store.history(s.id, before_seq=1) == []


# concurrency ----------------------------------------------------------------------------


async def test_racing_submits_with_one_message_id_make_one_turn(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    results = await asyncio.gather(
        *(store.submit_turn(new(s.id, "hi", client_message_id="m1")) for _ in range(6))
    )
    assert sum(r.created for r in results) == 1
    assert len({r.turn.id for r in results}) == 1
    assert len(await store.active_turns(s.id)) == 1
    assert len(await store.messages(s.id)) == 2


async def test_racing_submits_with_one_message_id_and_different_text(
    store: SqlChatStore,
) -> None:
    s = await store.create_session("alice")
    results = await asyncio.gather(
        *(store.submit_turn(new(s.id, f"text {i}", client_message_id="m1")) for i in range(4)),
        return_exceptions=True,
    )
    created = [r for r in results if not isinstance(r, BaseException)]
    assert len(created) == 1
    assert all(isinstance(r, MessageIdConflict) for r in results if r not in created)
    assert len(await store.active_turns(s.id)) == 1


async def test_racing_submits_get_distinct_seqs(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    results = await asyncio.gather(*(store.submit_turn(new(s.id, f"m{i}")) for i in range(6)))
    assert sorted(r.turn.seq for r in results) == [1, 2, 3, 4, 5, 6]


async def test_finish_turn_has_exactly_one_winner(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    t = (await store.submit_turn(new(s.id))).turn
    await store.start_turn(t.id, 0)
    statuses = [TurnStatus.COMPLETED, TurnStatus.FAILED, TurnStatus.CANCELLED] * 2
    wins = await asyncio.gather(
        *(
            store.finish_turn(t.id, 1, TurnOutcome(status, content=f"by {i}"))
            for i, status in enumerate(statuses)
        )
    )
    assert wins.count(True) == 1
    winner = wins.index(True)
    assert (await store.get_turn(t.id)).status is statuses[winner]
    assert (await store.messages(s.id))[1].content == f"by {winner}"


async def test_dispatch_next_never_dispatches_two_per_session(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    for i in range(3):
        await store.submit_turn(new(s.id, f"m{i}"))
    dispatched = await asyncio.gather(*(store.dispatch_next(s.id) for _ in range(6)))
    assert len([d for d in dispatched if d is not None]) == 1
    assert len([t for t in await store.active_turns(s.id) if t.dispatched]) == 1


@pytest.mark.postgres
async def test_unique_constraints_back_up_the_session_lock(
    pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the row lock, racing inserts collide on the unique constraints and
    the retry still ends with one turn per message id and distinct seqs."""
    await migrate(pg_database)
    store = SqlChatStore(pg_database)
    await store.startup()
    try:
        s = await store.create_session("alice")
        record = await store.get_session(s.id, "alice")

        async def no_lock(*_: object) -> object:
            return record

        monkeypatch.setattr(submit, "lock_session", no_lock)
        same = await asyncio.gather(
            *(store.submit_turn(new(s.id, "hi", client_message_id="m1")) for _ in range(4))
        )
        assert sum(r.created for r in same) == 1 and len({r.turn.id for r in same}) == 1
        more = await asyncio.gather(*(store.submit_turn(new(s.id, "x")) for _ in range(3)))
        assert sorted(r.turn.seq for r in more) == [2, 3, 4]
    finally:
        await store.shutdown()


# failures ---------------------------------------------------------------------------


async def test_unmigrated_database_is_schema_out_of_date(empty_url: str) -> None:
    store = SqlChatStore(empty_url)
    await store.startup()
    try:
        await store.ping()
        with pytest.raises(SchemaOutOfDate, match="turnrelay migrate"):
            await store.create_session("alice")
    finally:
        await store.shutdown()


async def test_unreachable_postgres_is_backend_unavailable() -> None:
    store = SqlChatStore("postgresql+asyncpg://postgres@127.0.0.1:1/test")
    await store.startup()  # no I/O yet
    try:
        with pytest.raises(BackendUnavailable):
            await store.ping()
        with pytest.raises(BackendUnavailable):
            await store.create_session("alice")
    finally:
        await store.shutdown()


async def test_unknown_postgres_database_is_backend_unavailable(postgres_url: str) -> None:
    missing = postgres_url.rsplit("/", 1)[0] + f"/turnrelay_missing_{uuid.uuid4().hex[:8]}"
    store = SqlChatStore(missing)
    await store.startup()
    try:
        with pytest.raises(BackendUnavailable):
            await store.ping()
    finally:
        await store.shutdown()


async def test_unusable_sqlite_path_is_backend_unavailable() -> None:
    # The parent "directory" is a device file: it cannot be created or used.
    store = SqlChatStore("sqlite+aiosqlite:////dev/null/turnrelay/chat.db")
    with pytest.raises(BackendUnavailable):
        await store.startup()
        await store.ping()
    await store.shutdown()


async def test_sqlite_uses_wal(tmp_path: object) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/new/dir/chat.db"
    store = SqlChatStore(url)
    await store.startup()
    try:
        await store.ping()
        engine = store._engine
        assert engine is not None
        async with engine.connect() as conn:
            mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar_one()
        assert mode == "wal"
    finally:
        await store.shutdown()


async def test_sqlite_runs_on_the_loop_and_two_stores_of_one_file_never_deadlock(
    tmp_path: object,
) -> None:
    # SQLite runs on the loop's own thread (no aiosqlite thread per
    # connection). A writer waiting inside SQLite for another connection's
    # write lock would then block the loop that the holder needs to finish:
    # every writer of the process, of any store of that file, takes turns
    # before it begins instead.
    url = f"sqlite+aiosqlite:///{tmp_path}/shared.db"
    await migrate(url)
    one, two = SqlChatStore(url), SqlChatStore(url)
    await one.startup()
    await two.startup()
    threads = threading.active_count()
    try:
        sessions_ = [await (one, two)[i % 2].create_session("alice") for i in range(20)]

        async def slow_writer() -> None:
            # A write transaction that yields to the loop while it holds the lock.
            async with one._begin() as conn:
                await conn.exec_driver_sql("UPDATE sessions SET title = 'held'")
                await asyncio.sleep(0.2)

        started = time.monotonic()
        holder = asyncio.create_task(slow_writer())
        await asyncio.sleep(0.05)
        results = await asyncio.gather(
            *(
                (one, two)[i % 2].submit_turn(new(s.id, max_running_per_user=100))
                for i, s in enumerate(sessions_)
            )
        )
        await holder
        # Waited for the holder, not in SQLite's busy wait (which blocks the
        # loop, the holder with it, until its 30 s timeout).
        assert time.monotonic() - started < 10
        assert len({r.turn.id for r in results}) == 20
        assert threading.active_count() == threads  # no thread per connection
    finally:
        await one.shutdown()
        await two.shutdown()


async def test_racing_submits_across_sessions_respect_the_user_cap(store: SqlChatStore) -> None:
    sessions_ = [await store.create_session("alice") for _ in range(8)]
    results = await asyncio.gather(
        *(
            store.submit_turn(
                new(s.id, max_running_per_user=3, max_waiting_per_user=2, dispatch_if_idle=True)
            )
            for s in sessions_
        ),
        return_exceptions=True,
    )
    accepted = [r.turn for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(accepted) == 5 and len(refused) == 3
    assert sum(t.dispatched for t in accepted) == 3
    assert await store.count_running_for_user("alice") == 3
    positions = sorted([await store.queue_position(t) for t in accepted if not t.dispatched])
    assert positions == [1, 2]


# regenerate ---------------------------------------------------------------------------


async def test_a_regenerate_supersedes_the_answer_it_replaces(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    first = await run_turn(store, s.id, "q1")
    second = await run_turn(store, s.id, "q2")
    await store.set_cli_session(s.id, "cli-1")
    # Regenerate the latest answer: q2 is answered again, the old answer leaves.
    again = (await store.submit_turn(new(s.id, "q2", regenerate=True))).turn
    assert (await store.get_turn(second)).superseded_by == again.id
    assert (await store.get_turn(first)).superseded_by is None
    shown = [(m.role, m.turn_id) for m in await store.messages(s.id)]
    assert shown == [
        ("user", first),
        ("assistant", first),
        ("user", again.id),
        ("assistant", again.id),
    ]
    assert [m.turn_id for m in await store.history(s.id, again.seq)] == [first, first]
    # The CLI's transcript holds the old answer: the next turn starts a new one.
    assert await store.cli_session(s.id) is None


async def test_a_named_regenerate_supersedes_that_answer_and_all_after(store: SqlChatStore) -> None:
    s = await store.create_session("alice")
    ids = [await run_turn(store, s.id, f"q{i}") for i in range(3)]
    target = await store.get_turn(ids[0])
    again = (
        await store.submit_turn(
            new(s.id, "q0", regenerate=True, replaces_message_id=target.assistant_message_id)
        )
    ).turn
    assert [(await store.get_turn(i)).superseded_by for i in ids] == [again.id] * 3
    assert {m.turn_id for m in await store.messages(s.id)} == {again.id}
    # A regenerate naming no known message, in a session with nothing to replace,
    # is just a new turn.
    fresh = await store.create_session("alice")
    only = (
        await store.submit_turn(new(fresh.id, "x", regenerate=True, replaces_message_id="nope"))
    ).turn
    assert (await store.get_turn(only.id)).superseded_by is None
