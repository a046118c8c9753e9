"""The ObjectStore port, its records, and the only way to build a key.

An object store holds bytes under keys, each stored object carrying an opaque
``version`` (an S3 ETag, a GCS generation, a local file's identity). Writes can
be conditional, which is what keeps a stale writer from replacing a newer
transcript:

    put(key, data)                       overwrite, whatever is there
    put(key, data, if_none_match=True)   create only: PreconditionFailed if the key exists
    put(key, data, if_version=v)         replace only if the stored version is still ``v``:
                                         PreconditionFailed if it changed or is gone

Each successful ``put`` returns the new version; feed it to the next
``if_version`` to chain writes. Versions are opaque strings: compare them for
equality, never parse them. ``get`` and ``head`` raise ``ObjectNotFound`` for an
absent key; ``delete`` of an absent key is a no-op (S3 and GCS cannot tell the
difference cheaply and a retried delete must not fail). An unreachable service
raises ``BackendUnavailable``; no method answers a sentinel.

Keys are ``/``-joined segments of ``[0-9A-Za-z._-]`` (no segment empty, starting
with ``.``, or longer than 255 characters; 1024 bytes at most in all), made by
``object_key(*parts)`` and checked again by every backend with ``check_key``.
Nothing else is accepted, so no key can name anything outside the store's
configured bucket prefix or directory: there is no ``..``, no absolute path, no
NUL, no Unicode look-alike of ``/`` or ``.`` to smuggle through.
"""

from __future__ import annotations

import builtins
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from turnrelay.errors import BadRequest

MAX_SEGMENT = 255
MAX_KEY_BYTES = 1024
_SEGMENT = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z._-]*")
_PREFIX_TAIL = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z._-]*|")


@dataclass(frozen=True, slots=True)
class ObjectVersion:
    """What a successful ``put`` wrote: the key and its new opaque version."""

    key: str
    version: str


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    version: str
    size: int
    last_modified: datetime


@dataclass(frozen=True, slots=True)
class StoredObject:
    """The bytes of one version of an object, with that version's metadata."""

    info: ObjectInfo
    data: bytes


class ObjectStore(Protocol):
    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_version: str | None = None
    ) -> ObjectVersion:
        """Write ``data``; see the module docstring for the conditions."""
        ...

    async def get(self, key: str) -> StoredObject: ...

    async def head(self, key: str) -> ObjectInfo: ...

    async def delete(self, key: str) -> None: ...

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (a plain string prefix,
        not only whole segments), sorted by key."""
        ...


def _segment_error(part: object) -> str | None:
    if not isinstance(part, str):
        return f"key part must be a string, got {type(part).__name__}"
    if not part:
        return "empty key part"
    if len(part) > MAX_SEGMENT:
        return f"key part longer than {MAX_SEGMENT} characters"
    if _SEGMENT.fullmatch(part) is None:
        return f"key part {part[:40]!r} is not [0-9A-Za-z._-] or starts with '.'"
    return None


def object_key(*parts: str) -> str:
    """Join safe segments into a key; ``BadRequest`` when any part is unsafe.

    Parts are never rewritten (two different ids must not collapse to one key),
    so a caller with free-form input must map it to safe characters first.
    """
    if not parts:
        raise BadRequest("an object key needs at least one part", code="bad_object_key")
    for part in parts:
        problem = _segment_error(part)
        if problem is not None:
            raise BadRequest(problem, code="bad_object_key")
    return check_key("/".join(parts))


def check_key(key: str) -> str:
    """Return ``key`` if it is a well-formed key, else raise ``BadRequest``."""
    if not isinstance(key, str) or not key:
        raise BadRequest("empty object key", code="bad_object_key")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise BadRequest(f"object key longer than {MAX_KEY_BYTES} bytes", code="bad_object_key")
    for segment in key.split("/"):
        problem = _segment_error(segment)
        if problem is not None:
            raise BadRequest(problem, code="bad_object_key")
    return key


def check_prefix(prefix: str) -> str:
    """Return a listing prefix if safe: whole segments, then ``/`` or a partial segment."""
    if not isinstance(prefix, str):
        raise BadRequest("listing prefix must be a string", code="bad_object_key")
    if not prefix:
        return prefix
    if len(prefix.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise BadRequest(f"prefix longer than {MAX_KEY_BYTES} bytes", code="bad_object_key")
    *whole, tail = prefix.split("/")
    for segment in whole:
        problem = _segment_error(segment)
        if problem is not None:
            raise BadRequest(problem, code="bad_object_key")
    if _PREFIX_TAIL.fullmatch(tail) is None or len(tail) > MAX_SEGMENT:
        raise BadRequest(f"prefix tail {tail[:40]!r} is not safe", code="bad_object_key")
    return prefix


def check_put_conditions(if_none_match: bool, if_version: str | None) -> None:
    if if_none_match and if_version is not None:
        raise BadRequest("if_none_match and if_version exclude each other")
    if if_version is not None and (not isinstance(if_version, str) or not if_version):
        raise BadRequest("if_version must be a non-empty version string")


def check_store_prefix(prefix: str) -> str:
    """A configured bucket prefix (``s3://bucket/<prefix>``): safe segments, no slashes
    at either end; the empty prefix is the whole bucket."""
    prefix = prefix.strip("/")
    return check_key(prefix) if prefix else ""
