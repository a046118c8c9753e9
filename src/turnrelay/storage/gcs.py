"""ObjectStore on Google Cloud Storage, over its JSON API with ``httpx``.

Conditional writes are GCS generation preconditions: create only is
``ifGenerationMatch=0``, replace-if-unchanged is ``ifGenerationMatch=<generation>``;
both answer 412 when they lose. The version is the object's generation, which
changes on every write (even of identical bytes).

Why not ``obstore``'s GCS backend: it speaks the XML API, which the
``fake-gcs-server`` emulator does not serve for uploads, so its conditional
writes could not be proven against a real protocol server; the JSON API is
what every emulator and the real service share, and ``httpx`` is already a
dependency.

Credentials: with ``STORAGE_EMULATOR_HOST`` set (``host:port`` or a URL), requests
go there unauthenticated, as Google's own clients do. Otherwise a bearer token
comes from ``gcloud-aio-auth`` (the ``gcs`` extra): the service-account file in
``GOOGLE_APPLICATION_CREDENTIALS``, or the metadata server on GCP.
"""

from __future__ import annotations

import builtins
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import httpx

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

GCS_URL = "https://storage.googleapis.com"
SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]
# Same reasoning as S3: a stuck storage call must surface as BackendUnavailable
# within seconds, not hang the turn.
TIMEOUT = httpx.Timeout(30.0, connect=5.0)

TokenSource = Callable[[], Awaitable[str | None]]


class GCSObjectStore:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        emulator_host: str | None = None,
        service_file: str | None = None,
        token_source: TokenSource | None = None,
    ) -> None:
        self._bucket = bucket
        self._prefix = check_store_prefix(prefix)
        self._base = GCS_URL
        if emulator_host:
            self._base = emulator_host if "://" in emulator_host else f"http://{emulator_host}"
        self._base = self._base.rstrip("/")
        self._emulated = bool(emulator_host)
        self._service_file = service_file
        self._token_source = token_source
        self._token: Any = None
        self._client: httpx.AsyncClient | None = None

    async def startup(self) -> None:
        if self._client is not None:
            return
        if self._token_source is None and not self._emulated:
            try:
                from gcloud.aio.auth import Token
            except ImportError as exc:  # the optional extra is missing
                raise BackendUnavailable(
                    "gs:// storage needs the 'gcs' extra (gcloud-aio-auth) for credentials"
                ) from exc
            self._token = Token(service_file=self._service_file, scopes=SCOPES)
            self._token_source = self._token.get
        self._client = httpx.AsyncClient(base_url=self._base, timeout=TIMEOUT)

    async def shutdown(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._token is not None:
            await self._token.close()
            self._token = None
            self._token_source = None

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self._prefix}/{key}" if self._prefix else key

    def _object_path(self, name: str) -> str:
        return f"/storage/v1/b/{quote(self._bucket, safe='')}/o/{quote(name, safe='')}"

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
        content_type: str = "application/octet-stream",
    ) -> httpx.Response:
        if self._client is None:
            raise BackendUnavailable("GCSObjectStore used before startup()")
        headers = {}
        try:
            if self._token_source is not None:
                token = await self._token_source()
                if token:
                    headers["Authorization"] = f"Bearer {token}"
            if content is not None:
                headers["Content-Type"] = content_type
            return await self._client.request(
                method, path, params=params, content=content, headers=headers
            )
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"gs://{self._bucket}: {exc!r}") from exc
        except Exception as exc:  # the token source (aiohttp, a bad key file)
            raise BackendUnavailable(f"gs://{self._bucket} credentials: {exc!r}") from exc

    def _fail(self, response: httpx.Response, key: str) -> BackendUnavailable:
        return BackendUnavailable(
            f"gs://{self._bucket} answered {response.status_code} for {key!r}: "
            f"{response.text[:200]}"
        )

    async def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_version: str | None = None
    ) -> ObjectVersion:
        name = self._name(key)
        check_put_conditions(if_none_match, if_version)
        params = {"uploadType": "multipart"}
        if if_none_match:
            params["ifGenerationMatch"] = "0"
        elif if_version is not None:
            if not if_version.isdigit():  # not a generation: it cannot match
                raise PreconditionFailed(f"object {key!r} is not at version {if_version!r}")
            params["ifGenerationMatch"] = if_version
        path = f"/upload/storage/v1/b/{quote(self._bucket, safe='')}/o"
        body, content_type = _multipart(name, bytes(data))
        response = await self._request(
            "POST", path, params=params, content=body, content_type=content_type
        )
        if response.status_code == 412:
            raise PreconditionFailed(f"object {key!r}: generation precondition failed")
        if response.status_code == 404 and if_version is not None:
            raise PreconditionFailed(f"object {key!r} is gone")
        if response.status_code != 200:
            raise self._fail(response, key)
        return ObjectVersion(key, str(response.json()["generation"]))

    async def head(self, key: str) -> ObjectInfo:
        response = await self._request("GET", self._object_path(self._name(key)))
        if response.status_code == 404:
            raise ObjectNotFound(f"object {key!r} not found")
        if response.status_code != 200:
            raise self._fail(response, key)
        return _info(key, response.json())

    async def get(self, key: str) -> StoredObject:
        response = await self._request(
            "GET", self._object_path(self._name(key)), params={"alt": "media"}
        )
        if response.status_code == 404:
            raise ObjectNotFound(f"object {key!r} not found")
        if response.status_code != 200:
            raise self._fail(response, key)
        data = response.content
        # The bytes and their generation must come from one response: pairing
        # old bytes with a newer generation would let a stale writer win.
        generation = response.headers.get("x-goog-generation")
        if not generation:
            raise BackendUnavailable(f"gs://{self._bucket}: no generation in the answer")
        modified = response.headers.get("last-modified")
        if modified:
            info = ObjectInfo(key, generation, len(data), parsedate_to_datetime(modified))
        else:
            info = await self.head(key)
            if info.version != generation:
                raise BackendUnavailable(f"gs://{self._bucket}: {key!r} changed while read")
        return StoredObject(info, data)

    async def delete(self, key: str) -> None:
        response = await self._request("DELETE", self._object_path(self._name(key)))
        if response.status_code not in (200, 204, 404):
            raise self._fail(response, key)

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        check_prefix(prefix)
        full = f"{self._prefix}/{prefix}" if self._prefix else prefix
        strip = len(self._prefix) + 1 if self._prefix else 0
        found: builtins.list[ObjectInfo] = []
        params = {"prefix": full} if full else {}
        path = f"/storage/v1/b/{quote(self._bucket, safe='')}/o"
        while True:
            response = await self._request("GET", path, params=params)
            if response.status_code != 200:
                raise self._fail(response, prefix)
            body = response.json()
            for item in body.get("items", []):
                if self._prefix and not item["name"].startswith(f"{self._prefix}/"):
                    continue
                found.append(_info(item["name"][strip:], item))
            token = body.get("nextPageToken")
            if not token:
                break
            params = {**params, "pageToken": token}
        found.sort(key=lambda info: info.key)
        return found


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    """A ``multipart/related`` upload body: the object's metadata, then its bytes.

    Multipart rather than ``uploadType=media`` because fake-gcs-server applies
    generation preconditions only to multipart and resumable uploads (GCS itself
    applies them to all three).
    """
    boundary = uuid.uuid4().hex
    while boundary.encode() in data:
        boundary = uuid.uuid4().hex
    head = (
        f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
        f"{json.dumps({'name': name})}\r\n"
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/related; boundary={boundary}"


def _info(key: str, resource: dict[str, Any]) -> ObjectInfo:
    updated = datetime.fromisoformat(str(resource["updated"]).replace("Z", "+00:00"))
    return ObjectInfo(key, str(resource["generation"]), int(resource["size"]), updated)
