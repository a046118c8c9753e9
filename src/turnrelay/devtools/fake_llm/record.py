"""The record file: one JSON line per request, and one per streamed response when it ends.

The line format is described in the package docstring.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any


class _Recorder:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self._counter = itertools.count()

    def request(self, path: str, body: Any) -> int:
        index = next(self._counter)
        self._write({"event": "request", "request_index": index, "path": path, "body": body})
        return index

    def closed(self, index: int, *, completed: bool) -> None:
        self._write({"event": "closed", "request_index": index, "completed": completed})

    def _write(self, line: dict[str, Any]) -> None:
        if self.path is None:
            return
        line["t"] = time.monotonic()
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        # One unbuffered append per line: concurrent readers see whole lines only.
        with open(self.path, "ab", buffering=0) as file:
            file.write(data)
