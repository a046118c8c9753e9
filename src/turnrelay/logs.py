"""Log lines: text for a terminal, or JSON lines for a log pipeline.

A JSON line carries the turn it is about (``turn_id``, ``session_id``,
``attempt``, set by whoever handles the turn, for every line logged under it,
whatever the module) and the current ``trace_id`` when tracing is on, so a log
search joins a trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from turnrelay import tracing

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_turn: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "turnrelay_turn", default=None
)


@contextlib.contextmanager
def about_turn(turn_id: str, session_id: str, attempt: int | None = None) -> Iterator[None]:
    """Every line logged in this block (and in tasks it starts) names the turn."""
    fields: dict[str, Any] = {"turn_id": turn_id, "session_id": session_id}
    if attempt is not None:
        fields["attempt"] = attempt
    token = _turn.set(fields)
    try:
        yield
    finally:
        _turn.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_turn.get() or {})
        trace_id = tracing.trace_id()
        if trace_id is not None:
            line["trace_id"] = trace_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def dump_tasks() -> None:
    """Log every asyncio task of this process with the stack it waits in."""
    tasks = asyncio.all_tasks()
    log = logging.getLogger("turnrelay.tasks")
    for task in sorted(tasks, key=lambda t: t.get_name()):
        out = io.StringIO()
        task.print_stack(limit=12, file=out)
        log.warning("task %s:\n%s", task.get_name(), out.getvalue())
    log.warning("%d tasks", len(tasks))
