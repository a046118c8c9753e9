"""ObjectStore on a local directory, safe for several processes on one machine.

An object is the file ``<root>/<key>``. Every write goes to a fresh file under
``<root>/.tmp``, is fsynced and then renamed over the key, so a reader sees the
old bytes or the new ones, never a mix, and a crash leaves no half-written key.
Conditional writes check the current version and rename while holding an
exclusive ``flock`` on one of a fixed set of lock files (``<root>/.locks``,
chosen by a hash of the key): processes racing on one key serialise there, so
exactly one of two ``if_version`` writers wins.

The version is ``<inode>.<mtime ns>.<size>`` of the file. Under the lock every
write stamps an mtime strictly greater than the one it replaces, so a version
is never handed out twice for one key even when the kernel recycles the inode
within one clock tick. Reads ``fstat`` the open file, so the bytes and the
version always belong together.

Names starting with ``.`` are never keys (``check_key`` forbids them), which
keeps the temporary and lock files out of every key and listing. One limit of a
filesystem: a key cannot also be a prefix of another key (``a`` and ``a/b``);
such a write raises ``BadRequest``.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import fcntl
import os
import stat
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import ParamSpec, TypeVar

from turnrelay.errors import BackendUnavailable, BadRequest, ObjectNotFound, PreconditionFailed
from turnrelay.storage.base import (
    ObjectInfo,
    ObjectVersion,
    StoredObject,
    check_key,
    check_prefix,
    check_put_conditions,
)

# Enough stripes that unrelated keys rarely wait on each other, few enough that
# the lock files never need cleaning up.
LOCK_STRIPES = 64

P = ParamSpec("P")
T = TypeVar("T")


def _version(st: os.stat_result) -> str:
    return f"{st.st_ino:x}.{st.st_mtime_ns:x}.{st.st_size:x}"


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    modified = datetime.fromtimestamp(st.st_mtime_ns / 1e9, UTC)
    return ObjectInfo(key, _version(st), st.st_size, modified)


class LocalObjectStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root).absolute()
        self._tmp = self._root / ".tmp"
        self._locks = self._root / ".locks"

    @property
    def root(self) -> Path:
        return self._root

    async def startup(self) -> None:
        try:
            await asyncio.to_thread(self._make_dirs)
        except OSError as exc:
            raise BackendUnavailable(f"storage directory {self._root}: {exc}") from exc

    def _make_dirs(self) -> None:
        for path in (self._root, self._tmp, self._locks):
            path.mkdir(parents=True, exist_ok=True)

    async def shutdown(self) -> None:
        return None

    def _path(self, key: str) -> Path:
        # check_key admits only safe segments, so this join cannot leave the root.
        return self._root.joinpath(*check_key(key).split("/"))

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        stripe = zlib.crc32(key.encode()) % LOCK_STRIPES
        fd = os.open(self._locks / f"{stripe:02d}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    async def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_version: str | None = None
    ) -> ObjectVersion:
        path = self._path(key)
        check_put_conditions(if_none_match, if_version)
        return await self._run(self._put, key, path, bytes(data), if_none_match, if_version)

    def _put(
        self, key: str, path: Path, data: bytes, if_none_match: bool, if_version: str | None
    ) -> ObjectVersion:
        tmp = self._tmp / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            with self._locked(key):
                try:
                    current: os.stat_result | None = os.stat(path)
                except (FileNotFoundError, NotADirectoryError):
                    current = None
                if current is not None and not _is_file(current):
                    raise BadRequest(f"object key {key!r} is a prefix of other keys")
                if if_none_match and current is not None:
                    raise PreconditionFailed(f"object {key!r} already exists")
                if if_version is not None and (current is None or _version(current) != if_version):
                    raise PreconditionFailed(f"object {key!r} is not at version {if_version!r}")
                stamp = time.time_ns()
                if current is not None:
                    stamp = max(stamp, current.st_mtime_ns + 1)
                os.utime(tmp, ns=(stamp, stamp))
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except (FileExistsError, NotADirectoryError) as exc:
                    raise BadRequest(f"a prefix of object key {key!r} is itself a key") from exc
                os.replace(tmp, path)
                _fsync_dir(path.parent)
                return ObjectVersion(key, _version(os.stat(path)))
        finally:
            tmp.unlink(missing_ok=True)

    async def get(self, key: str) -> StoredObject:
        return await self._run(self._get, key, self._path(key))

    def _get(self, key: str, path: Path) -> StoredObject:
        try:
            with open(path, "rb") as handle:
                st = os.fstat(handle.fileno())
                if not _is_file(st):
                    raise ObjectNotFound(f"object {key!r} not found")
                return StoredObject(_info(key, st), handle.read())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise ObjectNotFound(f"object {key!r} not found") from exc

    async def head(self, key: str) -> ObjectInfo:
        return await self._run(self._head, key, self._path(key))

    def _head(self, key: str, path: Path) -> ObjectInfo:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"object {key!r} not found") from exc
        if not _is_file(st):
            raise ObjectNotFound(f"object {key!r} not found")
        return _info(key, st)

    async def delete(self, key: str) -> None:
        await self._run(self._delete, key, self._path(key))

    def _delete(self, key: str, path: Path) -> None:
        with self._locked(key):
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return
            _fsync_dir(path.parent)

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        check_prefix(prefix)
        return await self._run(self._list, prefix)

    def _list(self, prefix: str) -> builtins.list[ObjectInfo]:
        # Walk only below the deepest whole directory the prefix names.
        base_parts = prefix.split("/")[:-1]
        base = self._root.joinpath(*base_parts)
        found: builtins.list[ObjectInfo] = []
        for directory, dirnames, filenames in os.walk(base):
            dirnames[:] = [name for name in dirnames if not name.startswith(".")]
            rel = Path(directory).relative_to(self._root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(directory, name))
                except FileNotFoundError:
                    continue  # deleted while we walked
                found.append(_info(key, st))
        found.sort(key=lambda info: info.key)
        return found

    async def _run(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await asyncio.to_thread(func, *args, **kwargs)
        except OSError as exc:
            raise BackendUnavailable(f"local storage at {self._root}: {exc}") from exc


def _is_file(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse, which is harmless.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
