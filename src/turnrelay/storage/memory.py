"""The in-memory ObjectStore twin: one dict, the same conditions as the real stores.

Versions are a per-store counter, so a rewrite with identical bytes still gets a
new version (like a GCS generation, unlike an S3 ETag): the contract suite only
relies on "a successful write changes the version".
"""

from __future__ import annotations

import builtins
import itertools
from datetime import UTC, datetime

from turnrelay.errors import ObjectNotFound, PreconditionFailed
from turnrelay.storage.base import (
    ObjectInfo,
    ObjectVersion,
    StoredObject,
    check_key,
    check_prefix,
    check_put_conditions,
)


class MemoryObjectStore:
    def __init__(self) -> None:
        self._objects: dict[str, StoredObject] = {}
        self._versions = itertools.count(1)

    async def startup(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    async def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_version: str | None = None
    ) -> ObjectVersion:
        check_key(key)
        check_put_conditions(if_none_match, if_version)
        current = self._objects.get(key)
        if if_none_match and current is not None:
            raise PreconditionFailed(f"object {key!r} already exists")
        if if_version is not None and (current is None or current.info.version != if_version):
            raise PreconditionFailed(f"object {key!r} is not at version {if_version!r}")
        info = ObjectInfo(key, str(next(self._versions)), len(data), datetime.now(UTC))
        self._objects[key] = StoredObject(info, bytes(data))
        return ObjectVersion(key, info.version)

    async def get(self, key: str) -> StoredObject:
        check_key(key)
        try:
            return self._objects[key]
        except KeyError:
            raise ObjectNotFound(f"object {key!r} not found") from None

    async def head(self, key: str) -> ObjectInfo:
        return (await self.get(key)).info

    async def delete(self, key: str) -> None:
        check_key(key)
        self._objects.pop(key, None)

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        check_prefix(prefix)
        return [obj.info for key, obj in sorted(self._objects.items()) if key.startswith(prefix)]
