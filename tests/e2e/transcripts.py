"""Helpers for the end-to-end tests of the `claude` runtime's stored transcripts: a
cluster whose executors run the real bundled Claude Code CLI against the fake LLM,
each executor with a home and a sandbox of its own, and access to the objects the
executors stored (through the ObjectStore port, as a test process sees them)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.cluster import Cluster, running_cluster
from tests.e2e.test_claude_runtime import require_claude_sdk
from tests.procs import SSE, Proc, read_sse
from tests.storage_servers import MOTO_CREDENTIALS, create_gcs_bucket, create_s3_bucket
from turnrelay.storage.local import LocalObjectStore
from turnrelay.transcript.store import session_prefix

AUTH = {"authorization": "Bearer tok-alice"}
TOOL = 'fake:tool=calculate:{"expression": "6 * 7"}'


def storage_env(kind: str, request: pytest.FixtureRequest, tmp: Path) -> dict[str, str]:
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    if kind == "local":
        return {"TURNRELAY_STORAGE_URL": f"file://{tmp}/objects"}
    if kind == "s3":
        endpoint = request.getfixturevalue("moto_endpoint")
        create_s3_bucket(endpoint, bucket)
        return {
            "TURNRELAY_STORAGE_URL": f"s3://{bucket}/tenant",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": MOTO_CREDENTIALS["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": MOTO_CREDENTIALS["secret_access_key"],
        }
    url = request.getfixturevalue("fake_gcs_url")
    create_gcs_bucket(url, bucket)
    return {"TURNRELAY_STORAGE_URL": f"gs://{bucket}/tenant", "STORAGE_EMULATOR_HOST": url}


@contextlib.contextmanager
def claude_cluster(tmp: Path, storage: dict[str, str], **extra_env: str) -> Iterator[Cluster]:
    """One API and no executor yet; executors get the fake LLM as their model."""
    require_claude_sdk()
    env = {
        "TURNRELAY_MODEL": "claude:fake",
        # A failed model call fails at once instead of after minutes of retries.
        "CLAUDE_CODE_MAX_RETRIES": "0",
        **storage,
        **extra_env,
    }
    with running_cluster(tmp, apis=1, executors=0, extra_env=env) as c:
        c.extra_env.update(
            {"ANTHROPIC_BASE_URL": f"http://127.0.0.1:{c.llm.port}", "ANTHROPIC_API_KEY": "sk-fake"}
        )
        yield c


def start_executor(
    cluster: Cluster, name: str, sandbox: Path | None = None, **env: str
) -> tuple[Proc, Path]:
    """An executor with a home of its own under ``<tmp>/<name>``, and a sandbox of its
    own there too unless ``sandbox`` names one (the same absolute path on every
    executor, as in production, but only ever one executor's at a time)."""
    own = cluster.tmp / name
    (own / "home").mkdir(parents=True)
    proc = cluster.start_executor(
        HOME=str(own / "home"), TURNRELAY_SANDBOX_DIR=str(sandbox or own / "sandbox"), **env
    )
    return proc, own


def client(cluster: Cluster) -> httpx.Client:
    return httpx.Client(base_url=cluster.apis[0].url, timeout=60, headers=AUTH)


def new_session(http: httpx.Client) -> str:
    return str(http.post("/api/chat/sessions").json()["id"])


def turn(http: httpx.Client, sid: str, message: str) -> SSE:
    """One turn to its end; it must finish."""
    with http.stream("POST", f"/api/chat/sessions/{sid}/stream", json={"message": message}) as r:
        assert r.status_code == 200
        sse = read_sse(r)
    assert sse.done and sse.chunks[-1]["type"] == "finish", sse.chunks[-3:]
    return sse


def requests_with(cluster: Cluster, marker: str) -> list[dict[str, Any]]:
    """The bodies of the model requests whose text holds ``marker``, in order."""
    return [r["body"] for r in cluster.llm.requests() if marker in json.dumps(r.get("body") or {})]


def request_with(cluster: Cluster, marker: str) -> dict[str, Any]:
    (found,) = requests_with(cluster, marker)
    return found


def conversation(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A model request's messages without the CLI's own ``system`` messages (the
    environment it runs in)."""
    return [m for m in body["messages"] if m["role"] != "system"]


def blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def texts(message: dict[str, Any]) -> list[str]:
    return [b["text"] for b in blocks(message) if b["type"] == "text"]


class StoredTranscripts:
    """The objects the executors stored for one chat session, on ``file://`` storage."""

    def __init__(self, root: Path, user_id: str, session_id: str) -> None:
        self.objects = LocalObjectStore(str(root))
        self.prefix = session_prefix(user_id, session_id)

    def _run(self, coro: Any) -> Any:
        async def run() -> Any:
            await self.objects.startup()
            try:
                return await coro(self.objects)
            finally:
                await self.objects.shutdown()

        return asyncio.run(run())

    def listed(self, kind: str = "") -> list[str]:
        """Every stored key of the session; with ``kind`` (``c``, ``l``, ``q``) only
        those of that kind."""

        async def keys(objects: LocalObjectStore) -> list[str]:
            return sorted(info.key for info in await objects.list(self.prefix))

        found: list[str] = self._run(keys)
        return [k for k in found if not kind or f"/{kind}/" in k[len(self.prefix) :]]

    def get(self, key: str) -> bytes:
        async def get(objects: LocalObjectStore) -> bytes:
            return (await objects.get(key)).data

        data: bytes = self._run(get)
        return data

    def put(self, key: str, data: bytes) -> None:
        async def put(objects: LocalObjectStore) -> None:
            await objects.put(key, data)

        self._run(put)

    def delete(self, key: str) -> None:
        async def delete(objects: LocalObjectStore) -> None:
            await objects.delete(key)

        self._run(delete)

    def compacted(self) -> str:
        """The key of the session's one compacted transcript."""
        (key,) = self.listed("c")
        return key


def cli_transcript(sandbox: Path, cli_id: str) -> Path:
    """The transcript the CLI itself wrote on an executor's disk (never stripped)."""
    (path,) = sandbox.glob(f"*/.claude/projects/*/{cli_id}.jsonl")
    return path


def cli_session_of(key: str) -> str:
    """The CLI session id in a stored transcript's key (a UUID is kept as it is)."""
    cli_id = key.rsplit("/", 3)[-3]
    assert uuid.UUID(cli_id), key
    return cli_id
