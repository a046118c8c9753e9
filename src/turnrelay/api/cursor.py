"""Stream cursors: ``<turn_id>:<seq>``, the SSE ``id`` of every frame."""

from __future__ import annotations

import re
from dataclasses import dataclass

from turnrelay.errors import InvalidCursor

# ASCII digits: ``\d`` would take any script's (the document says [0-9] too).
CURSOR_PATTERN = r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}):([0-9]{1,12})$"
_CURSOR = re.compile(CURSOR_PATTERN)


@dataclass(frozen=True, slots=True)
class Cursor:
    turn_id: str
    seq: int

    def __str__(self) -> str:
        return f"{self.turn_id}:{self.seq}"


def parse_cursor(text: str) -> Cursor:
    match = _CURSOR.match(text)
    if not match:
        raise InvalidCursor(
            f"malformed cursor {text[:80]!r}: expected <turn_id>:<seq> as sent in the SSE id field"
        )
    return Cursor(match.group(1), int(match.group(2)))


def pick_cursor(header: str | None, query: str | None) -> Cursor | None:
    """The cursor from ``Last-Event-ID`` or ``?after=``; both must agree if both
    are given. Present but empty is malformed, not absent."""
    header = header.strip() if header is not None else None  # HTTP's own padding
    if header is not None and query is not None and header != query:
        raise InvalidCursor("Last-Event-ID and ?after= name different cursors")
    text = header if header is not None else query
    return parse_cursor(text) if text is not None else None
