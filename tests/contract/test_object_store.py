"""One ObjectStore contract, four backends: memory, local directory, S3, GCS.

S3 is ``moto`` in server mode and GCS is ``fake-gcs-server``, each a real HTTP
server started here as a subprocess on a free loopback port (once per test
session) and killed afterwards. Every test gets its own bucket, and the S3/GCS
stores use a bucket prefix, so the suite also proves the prefix confines them.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.racers import answer, end_racers, release, start_racer
from tests.storage_servers import (
    StoreSpec,
    create_gcs_bucket,
    create_s3_bucket,
    free_port,
)
from turnrelay.errors import (
    BackendUnavailable,
    BadRequest,
    NotFound,
    ObjectNotFound,
    PreconditionFailed,
)
from turnrelay.storage import ObjectStore, object_key, open_object_store

HOSTILE_KEYS = [
    "../escape",
    "a/../../escape",
    "/etc/passwd",
    "/abs",
    "a//b",
    "a/",
    ".",
    "..",
    ".hidden",
    "a/./b",
    "a\x00b",
    "\x00",
    "x" * 10_240,
    "\uff0e\uff0e/escape",  # fullwidth full stops
    "\u2024\u2024\u2215escape",  # one dot leader, division slash
    "a\u2044b",  # fraction slash
    "a\uff0fb",  # fullwidth solidus
    "C:\\windows",
    "a\\..\\b",
    "%2e%2e/escape",
    "caf\u00e9",
    "tab\tkey",
    "new\nline",
    "",
    "\ud800",
]


@pytest.fixture
def store(objects: ObjectStore) -> ObjectStore:
    return objects


async def _unprefixed_keys(spec: StoreSpec) -> list[str]:
    """Every key in the backend's whole bucket or directory's parent, prefix included."""
    if spec.kind == "local":
        # The store's own lock and temporary files live under ``.``-names in its root.
        parent = Path(spec.root).parent
        files = [p.relative_to(parent) for p in parent.rglob("*") if p.is_file()]
        return sorted(p.as_posix() for p in files if not p.parts[1].startswith("."))
    whole: ObjectStore = StoreSpec(spec.kind, bucket=spec.bucket, endpoint=spec.endpoint).build()
    await whole.startup()
    try:
        return [info.key for info in await whole.list()]
    finally:
        await whole.shutdown()


# -- reads and writes ------------------------------------------------------------


async def test_put_get_head_round_trip(store: ObjectStore) -> None:
    key = object_key("chat-transcripts", "user-1", "session-1.jsonl")
    data = bytes(range(256)) * 3
    written = await store.put(key, data)
    assert written.key == key and written.version

    got = await store.get(key)
    assert got.data == data
    assert got.info.key == key
    assert got.info.version == written.version
    assert got.info.size == len(data)

    head = await store.head(key)
    assert head.version == written.version and head.size == len(data)
    assert head.last_modified.tzinfo is not None


async def test_empty_object(store: ObjectStore) -> None:
    written = await store.put("empty", b"")
    got = await store.get("empty")
    assert got.data == b"" and got.info.size == 0 and got.info.version == written.version


async def test_missing_object_raises_typed_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        await store.get("nope/missing")
    with pytest.raises(NotFound):
        await store.head("nope/missing")


async def test_overwrite_changes_version(store: ObjectStore) -> None:
    first = await store.put("k", b"one")
    second = await store.put("k", b"two")
    assert second.version != first.version
    assert (await store.get("k")).data == b"two"


async def test_delete_and_delete_missing(store: ObjectStore) -> None:
    await store.put("gone", b"x")
    await store.delete("gone")
    with pytest.raises(ObjectNotFound):
        await store.get("gone")
    await store.delete("gone")  # absent: a no-op, not an error
    await store.delete("never-was")


# -- conditional writes -----------------------------------------------------------


async def test_create_only(store: ObjectStore) -> None:
    first = await store.put("t", b"first", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await store.put("t", b"second", if_none_match=True)
    got = await store.get("t")
    assert got.data == b"first" and got.info.version == first.version


async def test_replace_if_unchanged(store: ObjectStore) -> None:
    v1 = await store.put("t", b"v1")
    v2 = await store.put("t", b"v2", if_version=v1.version)
    assert v2.version != v1.version
    with pytest.raises(PreconditionFailed):
        await store.put("t", b"stale", if_version=v1.version)
    v3 = await store.put("t", b"v3", if_version=v2.version)
    got = await store.get("t")
    assert got.data == b"v3" and got.info.version == v3.version


async def test_replace_of_missing_or_deleted_fails(store: ObjectStore) -> None:
    with pytest.raises(PreconditionFailed):
        await store.put("never", b"x", if_version="1")
    v1 = await store.put("t", b"v1")
    await store.delete("t")
    with pytest.raises(PreconditionFailed):
        await store.put("t", b"again", if_version=v1.version)
    with pytest.raises(ObjectNotFound):
        await store.get("t")
    await store.put("t", b"recreated", if_none_match=True)


async def test_conditions_are_exclusive(store: ObjectStore) -> None:
    with pytest.raises(BadRequest):
        await store.put("t", b"x", if_none_match=True, if_version="1")
    with pytest.raises(BadRequest):
        await store.put("t", b"x", if_version="")


async def test_concurrent_creates_in_one_process(store: ObjectStore) -> None:
    async def create(n: int) -> bool:
        try:
            await store.put("race", f"{n}".encode(), if_none_match=True)
        except PreconditionFailed:
            return False
        return True

    results = await asyncio.gather(*(create(n) for n in range(6)))
    assert results.count(True) == 1


# -- listing ------------------------------------------------------------------------


async def test_list_by_prefix(store: ObjectStore) -> None:
    versions = {}
    for key in ["a/1", "a/2", "ab/3", "b/4", "a/deep/5"]:
        versions[key] = (await store.put(key, key.encode())).version
    assert [i.key for i in await store.list("a/")] == ["a/1", "a/2", "a/deep/5"]
    assert [i.key for i in await store.list("a")] == ["a/1", "a/2", "a/deep/5", "ab/3"]
    assert [i.key for i in await store.list("a/d")] == ["a/deep/5"]
    assert [i.key for i in await store.list("zzz")] == []
    everything = await store.list()
    assert [i.key for i in everything] == sorted(versions)
    assert {i.key: i.version for i in everything} == versions
    assert {i.key: i.size for i in everything} == {k: len(k) for k in versions}


# -- hostile keys ---------------------------------------------------------------------


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=lambda k: repr(k)[:24])
async def test_hostile_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(BadRequest):
        await store.put(key, b"evil")
    with pytest.raises(BadRequest):
        await store.put(key, b"evil", if_none_match=True)
    with pytest.raises(BadRequest):
        await store.get(key)
    with pytest.raises(BadRequest):
        await store.head(key)
    with pytest.raises(BadRequest):
        await store.delete(key)


async def test_hostile_keys_write_nothing_outside(store: ObjectStore, spec: StoreSpec) -> None:
    await store.put("inside", b"ok")
    for key in HOSTILE_KEYS:
        with pytest.raises(BadRequest):
            await store.put(key, b"evil")
    for prefix in ["../", "/", "a/../", "..", "\uff0e\uff0e/", "a\x00"]:
        with pytest.raises(BadRequest):
            await store.list(prefix)
    if spec.kind == "memory":
        assert [i.key for i in await store.list()] == ["inside"]
        return
    outside = await _unprefixed_keys(spec)
    expected = "store/inside" if spec.kind == "local" else "tenant/t1/inside"
    assert outside == [expected]


# -- two processes racing ------------------------------------------------------------

ROUNDS = 15


@pytest.mark.slow
async def test_two_processes_race(shared_spec: StoreSpec) -> None:
    store: Any = shared_spec.build()
    await store.startup()
    spec = shared_spec.to_json()
    writers = [
        await start_racer("tests.storage_servers", "race", spec, "race/key", name)
        for name in ("p1", "p2")
    ]
    try:
        for round_no in range(1, ROUNDS + 1):
            base = await store.put("race/key", f"base:{round_no}".encode())
            # both at once: they race on one version
            await release(writers, [base.version] * 2)
            answers = [await answer(w) for w in writers]
            winners = [i for i, a in enumerate(answers) if a.startswith("won ")]
            assert len(winners) == 1, (round_no, answers)
            assert answers[1 - winners[0]] == "lost", answers
            got = await store.get("race/key")
            assert got.data == f"p{winners[0] + 1}:{round_no}".encode()
            assert got.info.version == answers[winners[0]].split(" ", 1)[1]
    finally:
        await end_racers(writers)
        await store.shutdown()


# -- selected by URL, configured by the usual settings ---------------------------------


async def _conditional_round_trip(store: ObjectStore) -> None:
    await store.startup()
    try:
        first = await store.put("via-url", b"1", if_none_match=True)
        await store.put("via-url", b"2", if_version=first.version)
        with pytest.raises(PreconditionFailed):
            await store.put("via-url", b"3", if_version=first.version)
        assert (await store.get("via-url")).data == b"2"
    finally:
        await store.shutdown()


async def test_s3_from_url_and_aws_settings(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = f"u-{uuid.uuid4().hex[:12]}"
    create_s3_bucket(moto_endpoint, bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # read by obstore itself
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    environ = {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_REGION": "us-east-1"}
    store = open_object_store(f"s3://{bucket}/transcripts", environ=environ)
    await _conditional_round_trip(store)
    keys = await _unprefixed_keys(StoreSpec("s3", bucket=bucket, endpoint=moto_endpoint))
    assert keys == ["transcripts/via-url"]


async def test_gcs_from_url_and_emulator_setting(fake_gcs_url: str) -> None:
    bucket = f"u-{uuid.uuid4().hex[:12]}"
    create_gcs_bucket(fake_gcs_url, bucket)
    host = fake_gcs_url.removeprefix("http://")  # the emulator variable is often host:port
    store = open_object_store(f"gs://{bucket}/transcripts", environ={"STORAGE_EMULATOR_HOST": host})
    await _conditional_round_trip(store)
    keys = await _unprefixed_keys(StoreSpec("gcs", bucket=bucket, endpoint=fake_gcs_url))
    assert keys == ["transcripts/via-url"]


@pytest.mark.parametrize("kind", ["s3", "gcs"])
async def test_unreachable_service_is_backend_unavailable(kind: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store: ObjectStore = StoreSpec(kind, bucket="b", endpoint=dead).build()
    await store.startup()
    try:
        with pytest.raises(BackendUnavailable):
            await store.get("k")
        with pytest.raises(BackendUnavailable):
            await store.put("k", b"x", if_none_match=True)
    finally:
        await store.shutdown()
