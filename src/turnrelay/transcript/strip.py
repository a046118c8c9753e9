"""Compacting a Claude Code CLI transcript (JSONL, entries linked by
``uuid``/``parentUuid``) before it is stored, and checking one before a resume.

``strip`` drops the entries whose ``type`` is in ``STRIPPED``, and the
``attachment`` entries whose attachment type is in ``STRIPPED_ATTACHMENTS``:
entries the CLI writes for its own bookkeeping that never reach the model (found
by resuming from the full and from the stripped file and comparing the model
requests the fake LLM recorded; ``tests/e2e/test_transcript_strip.py`` does it
with the bundled CLI; ``prompt_snapshot`` is the one exception, below). An entry whose
parent was dropped is re-parented to the nearest kept ancestor, so the chain
stays whole. Lines that do not parse, and lines without a dropped type, are kept
byte for byte; a re-parented line is changed only in its ``parentUuid``.
"""

from __future__ import annotations

import json
from typing import Any

# Entry types of the CLI's transcript that never reach the model: measured on the
# bundled CLI (resume from the full and the stripped file, identical recorded model
# requests). With ``STRIPPED_ATTACHMENTS``, on a 3-turn transcript with two tool
# calls this removes 45 % of the bytes (25,964 -> 14,475 bytes, CLI 2.1.337).
STRIPPED: frozenset[str] = frozenset(
    {
        "api-request",
        "api-request-blob",
        "api-request-route",
        "api-request-shape",
        "atis-latch",
        "cost-state",
        "last-prompt",
        "mode",
        "queue-operation",
        "tools-used",
    }
)
# Attachment types dropped too. Most attachments reach the model (the environment,
# model and date ones become the CLI's ``system`` message), so they are named one by
# one. ``prompt_snapshot`` is the CLI's copy of the system prompt and tools it sent,
# the biggest entry after the messages themselves; resumed with it, the CLI sends
# the snapshot's system prompt instead of the one it is given. The runtime gives it
# the same prompt every turn of a CLI session (the configured one, plus the earlier
# turns it began with), so dropping it changes a model request only when the
# configured prompt changed, and then the new one applies: measured, the rest of
# the request is the same. (``session_context`` is kept: empty in every transcript
# measured, so whether it reaches the model when it is not is unknown.)
STRIPPED_ATTACHMENTS: frozenset[str] = frozenset({"prompt_snapshot"})


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _dropped(
    entry: dict[str, Any] | None, types: frozenset[str], attachments: frozenset[str]
) -> bool:
    if entry is None:
        return False
    kind = entry.get("type")
    if kind == "attachment":
        attachment = entry.get("attachment")
        return isinstance(attachment, dict) and attachment.get("type") in attachments
    return kind in types


def strip(
    data: bytes,
    types: frozenset[str] = STRIPPED,
    attachments: frozenset[str] = STRIPPED_ATTACHMENTS,
) -> bytes:
    lines = data.splitlines(keepends=True)
    parsed = [_parse(line) for line in lines]
    drops = [_dropped(entry, types, attachments) for entry in parsed]
    # uuid -> parentUuid of every dropped entry, to walk past them.
    dropped: dict[str, Any] = {}
    for entry, drop in zip(parsed, drops, strict=True):
        if drop and entry is not None and isinstance(entry.get("uuid"), str):
            dropped[entry["uuid"]] = entry.get("parentUuid")
    out: list[bytes] = []
    for line, entry, drop in zip(lines, parsed, drops, strict=True):
        if entry is None:
            out.append(line)
            continue
        if drop:
            continue
        parent = entry.get("parentUuid")
        if isinstance(parent, str) and parent in dropped:
            seen: set[str] = set()
            while isinstance(parent, str) and parent in dropped and parent not in seen:
                seen.add(parent)
                parent = dropped[parent]
            if isinstance(parent, str) and parent in dropped:
                parent = None  # a cycle of dropped entries: no kept ancestor to name
            line = _reparented(line, entry, parent)
        out.append(line)
    return b"".join(out)


def _reparented(line: bytes, entry: dict[str, Any], parent: Any) -> bytes:
    """``line`` with only its ``parentUuid`` changed to ``parent``."""
    old = b'"parentUuid":' + json.dumps(entry["parentUuid"]).encode()
    if line.count(old) == 1:
        return line.replace(old, b'"parentUuid":' + json.dumps(parent).encode())
    # Not in the CLI's compact form: re-encode the entry (its content unchanged).
    end = line[len(line.rstrip(b"\r\n")) :]
    entry = {**entry, "parentUuid": parent}
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode() + end


def transcript_problem(data: bytes) -> str | None:
    """Why ``data`` cannot be resumed (``None`` when it can): it must hold at
    least one user and one assistant message."""
    kinds = {entry.get("type") for entry in map(_parse, data.splitlines()) if entry is not None}
    if "user" not in kinds:
        return "no user message"
    if "assistant" not in kinds:
        return "no assistant message"
    return None
