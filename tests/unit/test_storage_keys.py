"""Key building and storage-URL parsing: nothing unsafe gets through."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from turnrelay.errors import BadRequest, ConfigError
from turnrelay.storage import check_key, check_prefix, object_key, open_object_store
from turnrelay.storage.local import LocalObjectStore
from turnrelay.storage.memory import MemoryObjectStore


def test_object_key_joins_safe_parts() -> None:
    key = object_key("chat-transcripts", "0b6f-aa", "9c1d-ee.jsonl")
    assert key == "chat-transcripts/0b6f-aa/9c1d-ee.jsonl"
    assert object_key("a") == "a"
    assert object_key("A_z-0.9", "x" * 255) == "A_z-0.9/" + "x" * 255
    assert check_key(key) == key


@pytest.mark.parametrize(
    "parts",
    [
        (),
        ("",),
        ("a/b",),
        ("..",),
        (".",),
        (".hidden",),
        ("a", "../b"),
        ("/abs",),
        ("a\x00b",),
        ("x" * 256,),
        ("\uff0e\uff0e",),
        ("a\u2215b",),
        ("caf\u00e9",),
        ("white space",),
        ("a\\b",),
        ("%2e%2e",),
        ("a\n",),
    ],
    ids=repr,
)
def test_object_key_refuses_unsafe_parts(parts: tuple[str, ...]) -> None:
    with pytest.raises(BadRequest) as caught:
        object_key(*parts)
    assert caught.value.code == "bad_object_key"


def test_object_key_refuses_non_strings() -> None:
    with pytest.raises(BadRequest):
        object_key(123)  # type: ignore[arg-type]
    with pytest.raises(BadRequest):
        object_key(b"bytes")  # type: ignore[arg-type]


def test_key_length_is_bounded() -> None:
    parts = ["y" * 200] * 5  # 1004 bytes joined
    assert len(object_key(*parts)) == 1004
    with pytest.raises(BadRequest):
        object_key(*parts, "zzzzzzzzzzzzzzzzzzzz")
    with pytest.raises(BadRequest):
        check_key("a/" * 5000 + "a")


@pytest.mark.parametrize("prefix", ["", "a", "a/", "a/b", "a/b/", "a/b.c", "a/-"])
def test_safe_prefixes(prefix: str) -> None:
    assert check_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["/", "/a", "../", "a/../", "a//", ".", "a/.", "\x00", "é"])
def test_unsafe_prefixes(prefix: str) -> None:
    with pytest.raises(BadRequest):
        check_prefix(prefix)


def test_random_keys_never_leave_the_root(tmp_path: Path) -> None:
    """Fuzz: any string either is refused or maps to a path inside the root."""
    store = LocalObjectStore(tmp_path / "root")
    root = store.root.resolve()
    alphabet = [*"ab./\\\x00-_~%:", "..", "\uff0e", "\u2215", "\u2024", "\u00e9", "/"]
    rng = random.Random(20240601)
    accepted = 0
    for _ in range(5000):
        key = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        try:
            path = store._path(key)
        except BadRequest:
            continue
        accepted += 1
        resolved = path.resolve()
        assert resolved.is_relative_to(root) and resolved != root, key
    assert accepted > 50  # the fuzz did exercise the accepting side


# -- open_object_store ------------------------------------------------------------


def test_memory_url() -> None:
    assert isinstance(open_object_store("memory://", environ={}), MemoryObjectStore)


def test_file_urls(tmp_path: Path) -> None:
    relative = open_object_store("file://./.turnrelay/storage", environ={})
    assert isinstance(relative, LocalObjectStore)
    assert relative.root == (Path.cwd() / ".turnrelay/storage").absolute()
    absolute = open_object_store(f"file://{tmp_path}/s", environ={})
    assert isinstance(absolute, LocalObjectStore) and absolute.root == tmp_path / "s"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://bucket/x",
        "redis://localhost",
        "s3://",
        "gs:///prefix",
        "s3://bucket/../escape",
        "gs://bucket/a/%2e%2e/b",
        "file://",
    ],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        open_object_store(url, environ={})


def test_cloud_urls_build_without_connecting() -> None:
    # Building must not touch the network: that happens in startup().
    s3 = open_object_store("s3://bucket/pre/fix", environ={"AWS_REGION": "eu-west-1"})
    gcs = open_object_store("gs://bucket/pre", environ={"STORAGE_EMULATOR_HOST": "127.0.0.1:1"})
    assert type(s3).__name__ == "S3ObjectStore"
    assert type(gcs).__name__ == "GCSObjectStore"
