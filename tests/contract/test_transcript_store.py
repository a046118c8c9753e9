"""TranscriptStore against every ObjectStore backend: the Claude Agent SDK's own
SessionStore conformance suite, then what turnrelay adds (turn scoping, compaction
that a stale writer cannot undo, confinement to the session's prefix)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from claude_agent_sdk.testing import run_session_store_conformance

from tests import transcript_writer
from tests.racers import answer, end_racers, release, start_racer
from tests.storage_servers import StoreSpec
from turnrelay.errors import BadRequest
from turnrelay.storage import ObjectStore
from turnrelay.transcript.store import (
    TranscriptStore,
    delete_session_transcripts,
    safe_id,
    session_prefix,
    unsafe_id,
)

KEY = {"project_key": "-sandbox-s1", "session_id": str(uuid.uuid4())}

HOSTILE_IDS = [
    "../../etc",
    "..",
    "/abs",
    "a/b",
    "chat-transcripts/other/x",
    "\x00",
    "caf\u00e9",
    "\uff0e\uff0e\u2215x",
    "A" * 5000,
    "DEADBEEF",
    "-abc",
    "--",
]


def _store(
    objects: ObjectStore,
    seq: int = 1,
    attempt: int = 1,
    user: str = "alice",
    session: str | None = None,
) -> TranscriptStore:
    return TranscriptStore(
        objects,
        user_id=user,
        session_id=session or "s-" + uuid.uuid4().hex,
        seq=seq,
        attempt=attempt,
    )


async def test_sdk_conformance(objects: ObjectStore) -> None:
    # Every contract gets a store of its own chat session: isolation, shared backend.
    await run_session_store_conformance(lambda: _store(objects))


async def test_a_turn_loads_the_newest_earlier_turn_and_its_own_appends(
    objects: ObjectStore,
) -> None:
    session = str(uuid.uuid4())
    one = _store(objects, 1, 1, session=session)
    await one.append(KEY, [{"type": "user", "uuid": "u1"}])
    assert await one.compact(KEY, b'{"type":"user","uuid":"u1"}\nnot json\n')
    dead = _store(objects, 2, 1, session=session)
    await dead.append(KEY, [{"type": "user", "uuid": "dead"}])
    retry = _store(objects, 2, 2, session=session)
    # the retry sees turn 1's transcript (unparseable line kept in the bytes),
    # never the dead attempt's half
    assert await retry.load_bytes(KEY) == b'{"type":"user","uuid":"u1"}\nnot json\n'
    await retry.append(KEY, [{"type": "assistant", "uuid": "a2"}, {"type": "user", "uuid": "u1"}])
    assert await retry.load(KEY) == [
        {"type": "user", "uuid": "u1"},
        {"type": "assistant", "uuid": "a2"},
    ]


async def test_a_continuation_reads_its_own_turns_pause_and_nothing_later(
    objects: ObjectStore,
) -> None:
    session = str(uuid.uuid4())
    cli = {"project_key": "p", "session_id": str(uuid.uuid4())}
    assert await _store(objects, 1, 1, session=session).compact(cli, b"turn one\n")
    # Turn 2's attempt 2 paused (attempt 1 died before it).
    paused = _store(objects, 2, 2, session=session)
    assert await paused.compact(cli, b"turn one\nturn two up to the pause\n")
    # Turn 2's attempts read only earlier turns (turn 1's was superseded by
    # the pause's, which holds it) ...
    assert await _store(objects, 2, 3, session=session).load_bytes(cli) is None
    # ... but the continuation goes on from the pause, on any executor.
    going_on = TranscriptStore(
        objects, user_id="alice", session_id=session, seq=2, attempt=3, through=2
    )
    assert await going_on.load_bytes(cli) == b"turn one\nturn two up to the pause\n"
    assert await going_on.newest_cli_session("p") == cli["session_id"]
    # A continuation attempt that stored half of itself (a frozen one that woke
    # up after its retry began) never feeds the next retry, nor removes the pause.
    assert await going_on.compact(cli, b"half of the continuation\n")
    retry = TranscriptStore(
        objects, user_id="alice", session_id=session, seq=2, attempt=4, through=2
    )
    assert await retry.load_bytes(cli) == b"turn one\nturn two up to the pause\n"
    # The next turn reads the turn's newest attempt.
    assert await _store(objects, 3, 1, session=session).load_bytes(cli) == (
        b"half of the continuation\n"
    )
    with pytest.raises(BadRequest):
        TranscriptStore(objects, user_id="alice", session_id=session, seq=2, attempt=2, through=2)


async def test_a_stale_writer_never_replaces_a_newer_transcript(objects: ObjectStore) -> None:
    session = str(uuid.uuid4())
    newer = _store(objects, 3, 1, session=session)
    assert await newer.compact(KEY, b'{"type":"user","uuid":"t3"}\n')
    stale = _store(objects, 2, 1, session=session)
    assert await stale.compact(KEY, b'{"type":"user","uuid":"t2"}\n' * 100)
    nxt = _store(objects, 4, 1, session=session)
    assert await nxt.load_bytes(KEY) == b'{"type":"user","uuid":"t3"}\n'
    # the same attempt cannot write its turn twice
    assert not await newer.compact(KEY, b"other\n")


async def test_the_newest_cli_session_is_the_highest_earlier_seq_and_attempt(
    objects: ObjectStore,
) -> None:
    session = str(uuid.uuid4())
    stale, retry, later = (str(uuid.uuid4()) for _ in range(3))
    two = _store(objects, 2, 1, session=session)
    assert await two.newest_cli_session("p") is None
    # turn 1's retry (attempt 2) stored first, its woken-up attempt 1 after it
    retry_key = {"project_key": "p", "session_id": retry}
    await _store(objects, 1, 2, session=session).compact(retry_key, b"retry\n")
    stale_key = {"project_key": "p", "session_id": stale}
    await _store(objects, 1, 1, session=session).compact(stale_key, b"stale\n")
    await two.append({**stale_key, "subpath": "agent"}, [{"type": "x"}])
    assert await two.newest_cli_session("p") == retry
    later_key = {"project_key": "p", "session_id": later}
    await _store(objects, 3, 1, session=session).compact(later_key, b"later\n")
    assert await two.newest_cli_session("p") == retry  # turn 3 is not earlier than 2
    assert await _store(objects, 4, 1, session=session).newest_cli_session("p") == later
    assert await _store(objects, 2, 1, user="bob", session=session).newest_cli_session("p") is None


async def test_quarantine_keeps_the_refused_transcript_aside(objects: ObjectStore) -> None:
    session = str(uuid.uuid4())
    assert await _store(objects, 1, 1, session=session).compact(KEY, b"bad\n")
    two = _store(objects, 2, 1, session=session)
    target = await two.quarantine(KEY)
    assert target is not None and target.startswith(session_prefix("alice", session))
    assert await two.load_bytes(KEY) is None
    assert (await objects.get(target)).data == b"bad\n"


async def test_a_cli_sessions_earlier_turns_are_kept_beside_it(objects: ObjectStore) -> None:
    session = str(uuid.uuid4())
    two = _store(objects, 2, 1, session=session)
    assert await two.history(KEY) == ""
    await two.put_history(KEY, "<conversation>caf\u00e9</conversation>")
    await two.compact(KEY, b'{"type":"user","uuid":"u2"}\n')
    later = _store(objects, 5, 1, session=session)
    assert await later.history(KEY) == "<conversation>caf\u00e9</conversation>"
    listed = await later.list_sessions(KEY["project_key"])
    assert [e["session_id"] for e in listed] == [KEY["session_id"]]
    assert await delete_session_transcripts(objects, "alice", session) == 2


async def test_another_users_session_of_the_same_id_is_never_read(objects: ObjectStore) -> None:
    session = str(uuid.uuid4())
    alice = _store(objects, 1, 1, session=session)
    await alice.put_history(KEY, "alice's earlier turns")
    assert await alice.compact(KEY, b'{"type":"user","uuid":"alice"}\n')
    bob = _store(objects, 2, 1, user="bob", session=session)
    assert await bob.load_bytes(KEY) is None and await bob.history(KEY) == ""
    assert await bob.list_sessions(KEY["project_key"]) == []
    assert await bob.quarantine(KEY) is None
    assert await _store(objects, 2, 1, session=session).load_bytes(KEY) is not None


@pytest.mark.parametrize("hostile", HOSTILE_IDS)
async def test_hostile_ids_stay_inside_their_prefix(objects: ObjectStore, hostile: str) -> None:
    segment = safe_id(hostile)
    assert set(segment) <= set("0123456789abcdefABCDEF-")
    if not segment.startswith("--"):
        assert unsafe_id(segment) == hostile
    store = _store(objects, user=hostile, session=hostile)
    key = {"project_key": hostile, "session_id": hostile, "subpath": hostile}
    await store.append(key, [{"type": "x", "n": 1}])
    await store.append({"project_key": hostile, "session_id": hostile}, [{"type": "x"}])
    prefix = session_prefix(hostile, hostile)
    keys = [info.key for info in await objects.list("")]
    assert keys and all(k.startswith(prefix) for k in keys)
    assert await store.list_subkeys(key) == ([] if safe_id(hostile).startswith("--") else [hostile])
    assert await delete_session_transcripts(objects, hostile, hostile) == 2
    assert await objects.list("") == []


def test_ids_that_differ_never_share_a_segment() -> None:
    ids = ["abc", "ABC", "-616263", "616263", "a-b", "a--b", "", "x"][:]
    ids.remove("")
    assert len({safe_id(i) for i in ids}) == len(ids)


async def test_deleting_a_session_leaves_other_sessions(objects: ObjectStore) -> None:
    mine, other = str(uuid.uuid4()), str(uuid.uuid4())
    await _store(objects, session=mine).append(KEY, [{"type": "x"}])
    await _store(objects, session=other).append(KEY, [{"type": "x"}])
    await _store(objects, user="bob", session=mine).append(KEY, [{"type": "x"}])
    assert await delete_session_transcripts(objects, "alice", mine) == 1
    assert await _store(objects, 2, 1, session=other).load(KEY) is None  # other is live-only
    assert len(await objects.list("")) == 2


# -- two processes racing compactions -------------------------------------------------

RACE_ROUNDS = 12


@pytest.mark.slow
async def test_two_processes_racing_compactions_leave_the_newer(shared_spec: StoreSpec) -> None:
    """Each round two processes compact the same session at once, as turns 2r and
    2r+1; the older transcript is 200 times larger (a size guard would let it win).
    The next turn must load the newer, whoever finished last."""
    objects: Any = shared_spec.build()
    await objects.startup()
    session = str(uuid.uuid4())
    key: Any = transcript_writer.KEY
    spec = shared_spec.to_json()
    writers = [await start_racer("tests.transcript_writer", spec, session) for _ in range(2)]
    try:
        for round_no in range(1, RACE_ROUNDS + 1):
            older, newer = 2 * round_no, 2 * round_no + 1
            # Alternate which process writes which turn.
            jobs = [f"{older} 200000", f"{newer} 1000"][:: 1 if round_no % 2 else -1]
            await release(writers, jobs)
            assert [await answer(w, 30) for w in writers] == ["wrote", "wrote"], round_no
            reader = TranscriptStore(  # type: ignore[abstract]
                objects,
                user_id=transcript_writer.USER,
                session_id=session,
                seq=newer + 1,
                attempt=1,
            )
            loaded = await reader.load_bytes(key)
            assert loaded == transcript_writer.transcript(newer, 1_000), round_no
    finally:
        await end_racers(writers)
        await objects.shutdown()
