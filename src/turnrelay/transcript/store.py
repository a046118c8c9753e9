"""TranscriptStore: the Claude Code CLI's transcripts in object storage, as the
Claude Agent SDK's own ``SessionStore`` protocol.

One store is scoped to one attempt of one turn of one chat session. Its objects
live under ``chat-transcripts/{user}/{session}/`` and nowhere else: every id that
reaches a key (user, chat session, the SDK's project key and session id, a
subpath) goes through ``safe_id`` or a hash first, so nothing a client sends can
name a path outside that prefix::

    {base}/{project}/{cli session}/c/{seq}-{attempt}.jsonl        compacted, whole
    {base}/{project}/{cli session}/l/{seq}-{attempt}/{n}.jsonl    mirrored by appends
    {base}/{project}/{cli session}/s/{subpath}/…                  the same, per subpath
    {base}/{project}/{cli session}/q/{seq}-{attempt}.jsonl        quarantined (refused)
    {base}/{project}/{cli session}/h.txt                          the earlier turns it began with

``load`` answers the newest compacted transcript of an *earlier* turn (``seq``
below this store's) followed by this attempt's own appends: a retried attempt
never sees what a dead attempt mirrored, and a turn never sees a later one. A
turn that paused for tool approvals continues from its own pause: its store is
made with ``through`` (the attempt that paused), and reads up to that attempt's
transcript of this turn as well, never a later attempt's.
``newest_cli_session`` names the CLI session that holds the chat session's newest
compacted transcript, across CLI sessions: an attempt that woke up after its retry
stored its own under another CLI session has the lower ``(seq, attempt)``.
``compact`` writes a turn's whole transcript create-only under its own
``(seq, attempt)`` key, so a stale or slow writer can never replace a newer
transcript (the reader takes the highest key), whatever the sizes; then it
removes what that transcript supersedes.

Object storage has no append: each ``append`` is one create-only object with the
next number, re-listed and retried when another writer took that number.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

# The SDK's types only annotate: the API (which deletes transcripts with their
# session) must import this module without the `claude` extra installed.
if TYPE_CHECKING:
    from claude_agent_sdk.types import (
        SessionKey,
        SessionListSubkeysKey,
        SessionStoreEntry,
        SessionStoreListEntry,
    )

from turnrelay.errors import BadRequest, ObjectNotFound, PreconditionFailed
from turnrelay.storage.base import ObjectInfo, ObjectStore, object_key

log = logging.getLogger(__name__)

ROOT = "chat-transcripts"
_CANONICAL = re.compile(r"[0-9a-f]+(-[0-9a-f]+)*")
# An encoded id is "-" plus upper-case hex: never canonical (which starts with a
# hex digit), so two different ids can never share a key segment.
_MAX_CANONICAL = 128
_APPEND_TRIES = 5


def safe_id(value: str) -> str:
    """Map any id to a key segment of ``[0-9a-fA-F-]``, injectively.

    Lower-case hex groups joined by single dashes (UUIDs) are kept as they are;
    anything else becomes ``-`` plus the upper-case hex of its UTF-8 bytes, and
    an id too long for that ``--`` plus its SHA-256.
    """
    if not isinstance(value, str) or not value:
        raise BadRequest("an empty id cannot name a transcript", code="bad_transcript_id")
    if len(value) <= _MAX_CANONICAL and _CANONICAL.fullmatch(value):
        return value
    raw = value.encode("utf-8", "surrogatepass")
    if len(raw) <= 120:
        return "-" + raw.hex().upper()
    return "--" + hashlib.sha256(raw).hexdigest()


def unsafe_id(segment: str) -> str:
    """The id ``safe_id`` made a segment from (hashed ids cannot come back)."""
    if segment.startswith("--"):
        raise ValueError("a hashed id cannot be decoded")
    if segment.startswith("-"):
        return bytes.fromhex(segment[1:]).decode("utf-8", "surrogatepass")
    return segment


def session_prefix(user_id: str, session_id: str) -> str:
    """Where every transcript of one chat session lives (with a trailing ``/``)."""
    return object_key(ROOT, safe_id(user_id), safe_id(session_id)) + "/"


def _project(project_key: str) -> str:
    # The SDK's project keys are long sanitised paths; a digest keeps them short.
    return hashlib.sha256(project_key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _scope(seq: int, attempt: int) -> str:
    return f"{seq:08d}-{attempt:04d}"


def _parse_scope(name: str) -> tuple[int, int] | None:
    stem = name.removesuffix(".jsonl")
    seq, _, attempt = stem.partition("-")
    if not (seq.isdigit() and attempt.isdigit()):
        return None
    return int(seq), int(attempt)


def encode_lines(entries: Iterable[Any]) -> bytes:
    return b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in entries)


def decode_lines(data: bytes) -> list[SessionStoreEntry]:
    """The JSON objects of a JSONL blob; lines that do not parse are left out."""
    entries: list[SessionStoreEntry] = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)  # type: ignore[arg-type]
    return entries


class TranscriptStore:  # the SDK's SessionStore protocol, duck-typed as the SDK allows
    """A ``SessionStore`` over an ``ObjectStore``, for turn ``seq``, attempt ``attempt``
    of chat session ``session_id`` of ``user_id``."""

    def __init__(
        self,
        objects: ObjectStore,
        *,
        user_id: str,
        session_id: str,
        seq: int,
        attempt: int,
        through: int | None = None,
    ) -> None:
        if seq < 1 or attempt < 1:
            raise BadRequest("a transcript store needs a turn seq and attempt from 1")
        if through is not None and not 1 <= through < attempt:
            raise BadRequest("a continuation reads through an earlier attempt of its turn")
        self.objects = objects
        self.base = session_prefix(user_id, session_id)
        self.seq = seq
        self.attempt = attempt
        # The highest (seq, attempt) a read may answer: an earlier turn's, or
        # with ``through`` this turn's pause.
        self._bound = (seq, through) if through is not None else (seq - 1, 1 << 62)
        self._next: dict[str, int] = {}  # live prefix -> next part number

    # -- keys ----------------------------------------------------------------------

    def _stream(self, key: SessionKey) -> str:
        return self._main(key["project_key"], key["session_id"], key.get("subpath"))

    def _main(self, project_key: str, session_id: str, subpath: str | None = None) -> str:
        stream = f"{self.base}{_project(project_key)}/{safe_id(session_id)}"
        if subpath is not None:
            if not subpath:
                raise BadRequest("an empty subpath", code="bad_transcript_id")
            stream += f"/s/{safe_id(subpath)}"
        return stream

    def _live(self, stream: str) -> str:
        return f"{stream}/l/{_scope(self.seq, self.attempt)}/"

    # -- the SessionStore protocol ---------------------------------------------------

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        if not entries:
            return
        data = encode_lines(entries)
        live = self._live(self._stream(key))
        for _ in range(_APPEND_TRIES):
            number = self._next.get(live)
            if number is None:
                number = await self._count(live)
            try:
                await self.objects.put(f"{live}{number:08d}.jsonl", data, if_none_match=True)
            except PreconditionFailed:
                self._next.pop(live, None)  # another writer took it: look again
                continue
            self._next[live] = number + 1
            return
        raise PreconditionFailed(f"could not append to {live!r}: the part numbers kept moving")

    async def _count(self, live: str) -> int:
        parts = [_part(info.key, live) for info in await self.objects.list(live)]
        return max((n for n in parts if n is not None), default=-1) + 1

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        data = await self.load_bytes(key)
        if data is None:
            return None
        seen: set[str] = set()
        entries: list[SessionStoreEntry] = []
        for entry in decode_lines(data):
            uuid = entry.get("uuid")
            if isinstance(uuid, str):
                if uuid in seen:
                    continue  # a batch the SDK retried after it had landed
                seen.add(uuid)
            entries.append(entry)
        return entries

    async def load_bytes(self, key: SessionKey) -> bytes | None:
        """The transcript as stored: the newest readable compacted lines (byte for
        byte), then this attempt's appends; ``None`` if there is neither."""
        stream = self._stream(key)
        base = await self._newest_compacted(stream)
        live = self._live(stream)
        parts = sorted(
            (n, info.key)
            for info in await self.objects.list(live)
            if (n := _part(info.key, live)) is not None
        )
        if base is None and not parts:
            return None
        chunks: list[bytes] = []
        if base is not None:
            chunks.append(await self._get(base))
        for _, part in parts:
            chunks.append(await self._get(part))
        return b"".join(c if c.endswith(b"\n") or not c else c + b"\n" for c in chunks)

    async def _get(self, key: str) -> bytes:
        try:
            return (await self.objects.get(key)).data
        except ObjectNotFound:
            return b""  # compacted away between the listing and the read

    async def _newest_compacted(self, stream: str) -> str | None:
        best: tuple[tuple[int, int], str] | None = None
        for info in await self.objects.list(f"{stream}/c/"):
            scope = _parse_scope(info.key.rsplit("/", 1)[-1])
            if scope is None or scope > self._bound:
                continue
            if best is None or scope > best[0]:
                best = (scope, info.key)
        return None if best is None else best[1]

    async def newest_cli_session(self, project_key: str) -> str | None:
        """The CLI session whose readable compacted transcript (an earlier turn's,
        or this turn's pause) has the highest ``(seq, attempt)`` in this chat
        session; ``None`` if there is none."""
        prefix = f"{self.base}{_project(project_key)}/"
        best: tuple[tuple[int, int], str] | None = None
        for info in await self.objects.list(prefix):
            segment, kind = _head(info.key[len(prefix) :])  # a subpath's kind is "s"
            scope = _parse_scope(info.key.rsplit("/", 1)[-1])
            if kind != "c" or scope is None or scope > self._bound or segment.startswith("--"):
                continue
            if best is None or scope > best[0]:
                best = (scope, segment)
        return None if best is None else unsafe_id(best[1])

    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        prefix = f"{self.base}{_project(project_key)}/"
        mtimes: dict[str, int] = {}
        for info in await self.objects.list(prefix):
            segment, kind = _head(info.key[len(prefix) :])
            if kind not in ("c", "l"):
                continue  # a subpath's or a quarantined object
            mtime = _epoch_ms(info)
            mtimes[segment] = max(mtimes.get(segment, 0), mtime)
        return [
            {"session_id": unsafe_id(segment), "mtime": mtime}
            for segment, mtime in sorted(mtimes.items())
            if not segment.startswith("--")
        ]

    async def delete(self, key: SessionKey) -> None:
        stream = self._stream(key)
        await self._delete_prefix(f"{stream}/")

    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        prefix = f"{self._main(key['project_key'], key['session_id'])}/s/"
        found: set[str] = set()
        for info in await self.objects.list(prefix):
            segment, kind = _head(info.key[len(prefix) :])
            if kind in ("c", "l") and not segment.startswith("--"):
                found.add(unsafe_id(segment))
        return sorted(found)

    # -- beyond the protocol -----------------------------------------------------------

    async def compact(self, key: SessionKey, data: bytes) -> bool:
        """Store ``data`` as this turn's whole transcript, create-only under this
        attempt's key, then drop what it supersedes (earlier turns' compacted
        transcripts, the appends of this turn and earlier ones). ``False`` when
        this attempt already wrote one."""
        stream = self._stream(key)
        target = f"{stream}/c/{_scope(self.seq, self.attempt)}.jsonl"
        try:
            await self.objects.put(target, data, if_none_match=True)
        except PreconditionFailed:
            return False
        for info in await self.objects.list(f"{stream}/c/"):
            scope = _parse_scope(info.key.rsplit("/", 1)[-1])
            # Earlier turns' only: this turn's earlier attempts stay until the
            # next turn's, since a continuation reads through its pause's.
            if scope is not None and scope[0] < self.seq:
                await self.objects.delete(info.key)
        for info in await self.objects.list(f"{stream}/l/"):
            scope = _parse_scope(info.key[len(stream) + 3 :].split("/", 1)[0])
            if scope is not None and scope[0] <= self.seq:
                await self.objects.delete(info.key)
        return True

    async def put_history(self, key: SessionKey, text: str) -> None:
        """Keep the earlier turns (as system-prompt text) that a CLI session began
        with, when the chat session had turns before it: its transcript does not hold
        them, and every resume of it must show them again."""
        await self.objects.put(f"{self._stream(key)}/h.txt", text.encode())

    async def history(self, key: SessionKey) -> str:
        """What ``put_history`` kept for the CLI session (``""`` if nothing)."""
        try:
            return (await self.objects.get(f"{self._stream(key)}/h.txt")).data.decode()
        except ObjectNotFound:
            return ""

    async def quarantine(self, key: SessionKey) -> str | None:
        """Move the transcript ``load`` would answer out of the way, for inspection:
        the next load finds nothing. Returns the quarantine key."""
        stream = self._stream(key)
        data = await self.load_bytes(key)
        if data is None:
            return None
        target = f"{stream}/q/{_scope(self.seq, self.attempt)}.jsonl"
        await self.objects.put(target, data)
        base = await self._newest_compacted(stream)
        if base is not None:
            await self.objects.delete(base)
        await self._delete_prefix(self._live(stream))
        return target

    async def _delete_prefix(self, prefix: str) -> None:
        for info in await self.objects.list(prefix):
            await self.objects.delete(info.key)


async def delete_session_transcripts(objects: ObjectStore, user_id: str, session_id: str) -> int:
    """Delete every transcript of a chat session; returns how many objects went."""
    infos = await objects.list(session_prefix(user_id, session_id))
    for info in infos:
        await objects.delete(info.key)
    return len(infos)


def _head(rest: str) -> tuple[str, str]:
    """The first two segments of a key's rest (``""`` for a missing one)."""
    segment, _, tail = rest.partition("/")
    return segment, tail.partition("/")[0]


def _part(key: str, live: str) -> int | None:
    name = key[len(live) :]
    stem = name.removesuffix(".jsonl")
    return int(stem) if "/" not in name and stem.isdigit() else None


def _epoch_ms(info: ObjectInfo) -> int:
    return int(info.last_modified.timestamp() * 1000)
