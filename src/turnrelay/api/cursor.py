"""Stream cursors: ``<turn_id>:<seq>``, the SSE ``id`` of every frame."""

from __future__ import annotations

import re
from dataclasses import dataclass

from turnrelay.errors import InvalidCursor

_CURSOR = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}):(\d{1,12})$")


@dataclass(frozen=True, slots=True)
class Cursor:
    turn_id: str
    seq: int

    def __str__(self) -> str:
        return f"{self.turn_id}:{self.seq}"


def parse_cursor(text: str) -> Cursor:
    match = _CURSOR.match(text.strip())
    if not match:
        raise InvalidCursor(
            f"malformed cursor {text[:80]!r}: expected <turn_id>:<seq> as sent in the SSE id field"
        )
    return Cursor(match.group(1), int(match.group(2)))


def pick_cursor(header: str | None, query: str | None) -> Cursor | None:
    """The cursor from ``Last-Event-ID`` or ``?after=``; both must agree if both are given."""
    header = header.strip() if header else None
    query = query.strip() if query else None
    if header and query and header != query:
        raise InvalidCursor("Last-Event-ID and ?after= name different cursors")
    text = header or query
    return parse_cursor(text) if text else None
