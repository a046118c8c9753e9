"""The strip, on a transcript the real bundled CLI wrote: three turns with two
tool calls on one executor; then the next turn resumed twice, each time on a fresh
executor (home and sandbox wiped), once from the CLI's full file and once from
the stripped one the runtime stored, and the two turns after it the same way. The
model requests the fake LLM recorded must be the same, and the stripped file at
least 35 % smaller. The last turn runs with another configured system prompt:
there the full file pins the old one and the stripped file takes the new one
(the strip drops the CLI's ``prompt_snapshot``), the rest of the request equal."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cluster import Cluster
from tests.e2e.transcripts import (
    TOOL,
    StoredTranscripts,
    claude_cluster,
    cli_session_of,
    cli_transcript,
    client,
    new_session,
    requests_with,
    start_executor,
    storage_env,
    turn,
)
from turnrelay.transcript.strip import strip

pytestmark = pytest.mark.slow

MAX_KEPT = 0.65  # the stripped transcript is at least 35 % smaller
CHANGED = "Answer in French."


def _without_system(*bodies: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in body.items() if k != "system"} for body in bodies]


def _normalised(body: dict[str, Any]) -> dict[str, Any]:
    """A recorded model request without what legitimately differs between two
    executors: the CLI's device id (``metadata.user_id``), made afresh in every new
    CLI configuration directory. Everything else (system prompt, messages, tools,
    cache-control marks, the CLI session id) must be equal."""
    metadata = dict(body.get("metadata") or {})
    user = json.loads(metadata["user_id"])
    assert user.pop("device_id")
    return {**body, "metadata": {**metadata, "user_id": user}}


def _entries(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines()]


def _assert_kept_lines(full: bytes, stripped: bytes) -> None:
    """The stripped file is the full file's lines minus some, in order, each kept
    line byte for byte except a re-parented ``parentUuid``, and every ``parentUuid``
    names the nearest kept ancestor."""
    parent_of = {e["uuid"]: e.get("parentUuid") for e in _entries(full) if "uuid" in e}
    kept_uuids = {e["uuid"] for e in _entries(stripped) if "uuid" in e}
    lines = iter(full.splitlines(keepends=True))
    for line in stripped.splitlines(keepends=True):
        entry = json.loads(line)
        original = next(lines)
        while json.loads(original).get("uuid") != entry.get("uuid") or (
            "uuid" not in entry and original != line
        ):
            original = next(lines)  # a line the strip dropped
        parent = json.loads(original).get("parentUuid")
        while parent is not None and parent not in kept_uuids:
            parent = parent_of[parent]  # walk past dropped ancestors
        assert entry.get("parentUuid") == parent, entry
        was = json.dumps(json.loads(original).get("parentUuid"))
        assert line == original.replace(
            f'"parentUuid":{was}'.encode(), f'"parentUuid":{json.dumps(parent)}'.encode()
        )


def _resume(cluster: Cluster, name: str, sandbox: Path, sid: str, message: str, **env: str) -> None:
    shutil.rmtree(sandbox, ignore_errors=True)  # nothing of the last executor's disk
    executor, _ = start_executor(cluster, name, sandbox, **env)
    with client(cluster) as http:
        assert turn(http, sid, message).text() == f"Echo: {message}"
    executor.stop()


def test_resuming_the_stripped_transcript_sends_the_same_model_request(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex[:8]
    # One sandbox path for every executor (as in production), never two at once.
    sandbox = tmp_path / "sandbox"
    with claude_cluster(tmp_path, storage_env("local", request, tmp_path)) as cluster:
        with client(cluster) as http:
            sid = new_session(http)
            a, _ = start_executor(cluster, "a", sandbox)
            turn(http, sid, f"compute {marker} {TOOL}")
            turn(http, sid, f"and {marker}-2")
            turn(http, sid, f"now {marker}-3 fake:tool=current_time")
            a.stop()
        stored = StoredTranscripts(tmp_path / "objects", "alice", sid)
        key = stored.compacted()
        full = cli_transcript(sandbox, cli_session_of(key)).read_bytes()
        stripped = stored.get(key)

        assert stripped == strip(full)  # what the runtime stored
        print(f"transcript: {len(full)} -> {len(stripped)} bytes")
        assert len(stripped) <= MAX_KEPT * len(full), (len(full), len(stripped))
        _assert_kept_lines(full, stripped)

        # Turn 4 from the full file, then (that turn's transcript removed) the same
        # turn again from the stripped one; then turn 5 the same way, from the full
        # file that now holds turn 4 too, and from the stripped chain (the stripped
        # turn 3 resumed, and stripped again after turn 4).
        # Turn 6 the same way, with another configured system prompt.
        levels = [(f"again {marker}-4", {}), (f"later {marker}-5", {})]
        levels.append((f"last {marker}-6", {"TURNRELAY_SYSTEM_PROMPT": CHANGED}))
        for level, (message, env) in enumerate(levels):
            for newer in stored.listed("c"):
                stored.delete(newer)
            stored.put(key, full)
            _resume(cluster, f"full{level}", sandbox, sid, message, **env)
            full = cli_transcript(sandbox, cli_session_of(key)).read_bytes()
            for newer in stored.listed("c"):
                stored.delete(newer)
            stored.put(key, stripped)
            _resume(cluster, f"stripped{level}", sandbox, sid, message, **env)
            key = stored.compacted()
            stripped = stored.get(key)

            from_full, from_stripped = requests_with(cluster, message)
            assert len(json.dumps(from_full["messages"])) > 2000  # the earlier turns
            if env:
                # The one difference the strip makes: resumed from the full file the
                # CLI sends the system prompt of its ``prompt_snapshot`` entry, not the
                # one it is given; from the stripped file, the configured one.
                assert CHANGED not in json.dumps(from_full)
                assert CHANGED in json.dumps(from_stripped["system"])
                from_full, from_stripped = _without_system(from_full, from_stripped)
            assert _normalised(from_full) == _normalised(from_stripped), message
        print(f"after three more turns: {len(full)} -> {len(stripped)} bytes")
        assert len(stripped) <= MAX_KEPT * len(full), (len(full), len(stripped))
