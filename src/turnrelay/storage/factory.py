"""Build the ObjectStore that ``TURNRELAY_STORAGE_URL`` names.

    memory://              MemoryObjectStore (one process only)
    file://PATH            LocalObjectStore; ``file://./rel``, ``file:///abs``
    s3://bucket[/prefix]   S3ObjectStore; region, endpoint, credentials from ``AWS_*``
    gs://bucket[/prefix]   GCSObjectStore; ``STORAGE_EMULATOR_HOST`` or
                           ``GOOGLE_APPLICATION_CREDENTIALS``

Backends are imported only when named, so ``serve`` on a local directory never
loads obstore or the GCS client. The composition root passes its environment
(``environ``); nothing here reads ``os.environ`` on import.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from turnrelay.errors import BadRequest, ConfigError
from turnrelay.storage.base import ObjectStore, check_store_prefix

# S3 settings read from these variables on top of what obstore itself reads,
# because the AWS CLI/boto names differ from object_store's for the endpoint.
_S3_ENV = {
    "endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
}


def open_object_store(url: str, *, environ: Mapping[str, str] | None = None) -> ObjectStore:
    env = os.environ if environ is None else environ
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        from turnrelay.storage.memory import MemoryObjectStore

        return MemoryObjectStore()
    if scheme == "file":
        path = unquote(parts.netloc + parts.path)
        if not path:
            raise ConfigError(f"storage URL {url!r} names no directory")
        from turnrelay.storage.local import LocalObjectStore

        return LocalObjectStore(path)
    if scheme in ("s3", "gs"):
        bucket = parts.netloc
        if not bucket:
            raise ConfigError(f"storage URL {url!r} names no bucket")
        try:
            prefix = check_store_prefix(unquote(parts.path))
        except BadRequest as exc:
            raise ConfigError(f"storage URL {url!r}: prefix {exc.detail}") from exc
        if scheme == "s3":
            from turnrelay.storage.s3 import S3ObjectStore

            config: dict[str, Any] = {}
            for option, names in _S3_ENV.items():
                value = next((env[name] for name in names if env.get(name)), None)
                if value:
                    config[option] = value
            return S3ObjectStore(bucket, prefix, config=config)
        from turnrelay.storage.gcs import GCSObjectStore

        return GCSObjectStore(
            bucket,
            prefix,
            emulator_host=env.get("STORAGE_EMULATOR_HOST") or None,
            service_file=env.get("GOOGLE_APPLICATION_CREDENTIALS") or None,
        )
    raise ConfigError(
        f"unsupported storage URL {url!r}: use memory://, file://PATH, s3://bucket/prefix "
        "or gs://bucket/prefix"
    )
