"""Stateless resume of the `claude` runtime, with real processes: a turn with a
tool call runs on executor A; A stops and its whole directory (home, sandbox) is
deleted; the next turn runs on executor B, which has a HOME and a sandbox of its
own and shares nothing with A but the object storage. The model request of the
second turn must carry the first turn (the user message, the tool call, its
result, the answer) as real messages, not as system-prompt text. Storage on a
local directory, on S3 (moto) and on GCS (fake-gcs-server)."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import Cluster
from tests.e2e.transcripts import (
    TOOL,
    blocks,
    claude_cluster,
    client,
    conversation,
    new_session,
    request_with,
    start_executor,
    storage_env,
    turn,
)

pytestmark = pytest.mark.slow


@pytest.fixture(params=["local", "s3", "gcs"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    with claude_cluster(tmp_path, storage_env(request.param, request, tmp_path)) as c:
        yield c


def test_the_next_turn_on_another_executor_resumes_the_transcript(cluster: Cluster) -> None:
    marker = uuid.uuid4().hex[:8]
    with client(cluster) as http:
        sid = new_session(http)
        a, a_dir = start_executor(cluster, "a")
        answer = turn(http, sid, f"compute {marker} {TOOL}").text()
        assert answer == 'Tool calculate returned: {"expression": "6 * 7", "result": "42"}'
        a.stop()
        shutil.rmtree(a_dir)  # nothing of A's disk survives

        start_executor(cluster, "b")
        assert turn(http, sid, f"and now {marker}-2").text() == f"Echo: and now {marker}-2"

    body = request_with(cluster, f"{marker}-2")
    assert f"compute {marker}" not in json.dumps(body["system"])
    messages = conversation(body)
    roles = [m["role"] for m in messages]
    assert roles == ["user", "assistant", "user", "assistant", "user"], roles
    first, call, result, said, now = (blocks(m) for m in messages)
    assert any(f"compute {marker}" in b.get("text", "") for b in first)
    (use,) = [b for b in call if b["type"] == "tool_use"]
    assert use["name"] == "mcp__turnrelay__calculate" and use["input"] == {"expression": "6 * 7"}
    (res,) = [b for b in result if b["type"] == "tool_result"]
    assert res["tool_use_id"] == use["id"]
    assert json.loads(res["content"][0]["text"]) == {"expression": "6 * 7", "result": "42"}
    assert [b["text"] for b in said if b["type"] == "text"] == [answer]
    assert any(f"and now {marker}-2" in b.get("text", "") for b in now)
