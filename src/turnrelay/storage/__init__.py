"""ObjectStore: transcripts and other blobs, with conditional writes.

The port, its records and key building live in ``base``; ``open_object_store``
builds a backend from a storage URL and imports only the one it names.
"""

from turnrelay.storage.base import (
    ObjectInfo,
    ObjectStore,
    ObjectVersion,
    StoredObject,
    check_key,
    check_prefix,
    object_key,
)
from turnrelay.storage.factory import open_object_store

__all__ = [
    "ObjectInfo",
    "ObjectStore",
    "ObjectVersion",
    "StoredObject",
    "check_key",
    "check_prefix",
    "object_key",
    "open_object_store",
]
