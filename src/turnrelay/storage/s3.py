"""ObjectStore on S3 or any S3-compatible service, through ``obstore``.

``obstore`` (Python bindings of the Rust ``object_store`` crate) is natively
async, needs no boto/aiohttp stack, and sends real conditional writes: create
only is ``If-None-Match: *`` and replace-if-unchanged is ``If-Match: <etag>``
(its ``conditional_put="etag"`` mode), which S3 has honoured since 2024 and
MinIO, R2 and moto honour too. The version is the ETag.

Region, endpoint and credentials come from the usual ``AWS_*`` variables
(``AWS_REGION``, ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, web
identity, container and instance credentials), read by ``obstore`` when the
store is built; explicit ``config`` entries win. An ``http://`` endpoint turns on
``allow_http`` (local MinIO or moto).
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotFoundError,
    PreconditionError,
)
from obstore.store import S3Store

from turnrelay.errors import BackendUnavailable, ObjectNotFound, PreconditionFailed
from turnrelay.storage.base import (
    ObjectInfo,
    ObjectVersion,
    StoredObject,
    check_key,
    check_prefix,
    check_put_conditions,
    check_store_prefix,
)

if TYPE_CHECKING:
    from obstore import ObjectMeta, PutMode

# Transcript writes are small and on the turn's critical path: fail over to
# BackendUnavailable in seconds rather than obstore's default of minutes.
RETRY = {
    "max_retries": 3,
    "retry_timeout": timedelta(seconds=15),
    "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2)},
}
CLIENT = {"connect_timeout": timedelta(seconds=5), "timeout": timedelta(seconds=30)}


class S3ObjectStore:
    def __init__(self, bucket: str, prefix: str = "", *, config: Mapping[str, Any] | None = None):
        self._bucket = bucket
        self._prefix = check_store_prefix(prefix)
        self._config: dict[str, Any] = {"conditional_put": "etag", **(config or {})}
        self._store: S3Store | None = None

    def _client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = dict(CLIENT)
        endpoint = str(self._config.get("endpoint", ""))
        if endpoint.startswith("http://"):
            options["allow_http"] = True
        return options

    async def startup(self) -> None:
        if self._store is not None:
            return
        try:
            self._store = S3Store(
                self._bucket,
                prefix=self._prefix or None,
                config=self._config,  # type: ignore[arg-type]
                client_options=self._client_options(),  # type: ignore[arg-type]
                retry_config=RETRY,  # type: ignore[arg-type]
            )
        except BaseError as exc:
            raise BackendUnavailable(f"s3://{self._bucket}: {exc}") from exc

    async def shutdown(self) -> None:
        self._store = None

    @property
    def _s3(self) -> S3Store:
        if self._store is None:
            raise BackendUnavailable("S3ObjectStore used before startup()")
        return self._store

    def _unavailable(self, exc: Exception) -> BackendUnavailable:
        return BackendUnavailable(f"s3://{self._bucket}/{self._prefix}: {_first_line(exc)}")

    async def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_version: str | None = None
    ) -> ObjectVersion:
        check_key(key)
        check_put_conditions(if_none_match, if_version)
        mode: PutMode = "overwrite"
        if if_none_match:
            mode = "create"
        elif if_version is not None:
            mode = {"e_tag": if_version}
        try:
            result = await obstore.put_async(self._s3, key, data, mode=mode, use_multipart=False)
        except (AlreadyExistsError, PreconditionError) as exc:
            raise PreconditionFailed(f"object {key!r}: {_first_line(exc)}") from exc
        except (NotFoundError, FileNotFoundError) as exc:
            # S3 answers a conditional replace of a missing key with 404 on some services.
            if if_version is not None:
                raise PreconditionFailed(f"object {key!r} is gone") from exc
            raise self._unavailable(exc) from exc
        except (BaseError, OSError) as exc:
            raise self._unavailable(exc) from exc
        if not result["e_tag"]:
            raise BackendUnavailable(f"s3://{self._bucket}: the service answered no ETag")
        return ObjectVersion(key, result["e_tag"])

    async def get(self, key: str) -> StoredObject:
        check_key(key)
        try:
            response = await obstore.get_async(self._s3, key)
            data = bytes(await response.bytes_async())
        except (NotFoundError, FileNotFoundError) as exc:
            raise ObjectNotFound(f"object {key!r} not found") from exc
        except (BaseError, OSError) as exc:
            raise self._unavailable(exc) from exc
        return StoredObject(_info(key, response.meta), data)

    async def head(self, key: str) -> ObjectInfo:
        check_key(key)
        try:
            meta = await obstore.head_async(self._s3, key)
        except (NotFoundError, FileNotFoundError) as exc:
            raise ObjectNotFound(f"object {key!r} not found") from exc
        except (BaseError, OSError) as exc:
            raise self._unavailable(exc) from exc
        return _info(key, meta)

    async def delete(self, key: str) -> None:
        check_key(key)
        try:
            await obstore.delete_async(self._s3, key)
        except (NotFoundError, FileNotFoundError):
            return
        except (BaseError, OSError) as exc:
            raise self._unavailable(exc) from exc

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        check_prefix(prefix)
        found: builtins.list[ObjectInfo] = []
        try:
            # obstore lists whole path segments; filter a partial tail ourselves.
            base = prefix.rpartition("/")[0] or None
            async for batch in obstore.list(self._s3, prefix=base, chunk_size=1000):
                found.extend(_info(m["path"], m) for m in batch if m["path"].startswith(prefix))
        except (BaseError, OSError) as exc:
            raise self._unavailable(exc) from exc
        found.sort(key=lambda info: info.key)
        return found


def _info(key: str, meta: ObjectMeta) -> ObjectInfo:
    if not meta["e_tag"]:
        raise BackendUnavailable(f"object {key!r}: the service answered no ETag")
    return ObjectInfo(key, meta["e_tag"], meta["size"], meta["last_modified"])


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
