"""The turns this executor is running, so a cancel broadcast can reach them."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# A cancel may arrive before its turn is registered here (the broadcast raced the
# claim): remember it this long, for at most this many turns.
CANCEL_MEMORY_SECONDS = 600.0
CANCEL_MEMORY_SIZE = 10_000


def holding(turn_id: str, session_id: str) -> str:
    """How a held turn is named in the executor's liveness beat (and reaped)."""
    return f"{turn_id} {session_id}"


class StopReason(StrEnum):
    CANCEL = "cancel"  # a user asked: end the turn ``cancelled`` with its partial answer
    LEASE_LOST = "lease_lost"  # another executor owns the session now: write nothing
    GONE = "gone"  # the turn's rows were deleted (its session was): write nothing
    SHUTDOWN = "shutdown"  # this executor is stopping: write nothing, leave it to a retry


@dataclass
class Run:
    turn_id: str
    task: asyncio.Task[Any]
    reason: StopReason | None = field(default=None)

    def stop(self, reason: StopReason) -> None:
        if self.reason is None:
            self.reason = reason
        self.task.cancel()


class RunningTurns:
    """Also what this executor holds leases for (``hold``/``unhold``): its
    liveness beat publishes that list, so if the process freezes another
    executor knows which turns to publish again."""

    def __init__(self) -> None:
        self._runs: dict[str, Run] = {}
        self._cancelled: OrderedDict[str, float] = OrderedDict()
        self._held: dict[str, str] = {}  # turn_id -> session_id
        # Set when a turn is newly held: the liveness beat publishes it at once,
        # so a process that freezes right after taking a turn is not missed.
        self.held_changed = asyncio.Event()

    def hold(self, turn_id: str, session_id: str) -> None:
        self._held[turn_id] = session_id
        self.held_changed.set()

    def unhold(self, turn_id: str) -> None:
        self._held.pop(turn_id, None)

    @property
    def held(self) -> dict[str, str]:
        return dict(self._held)

    def __len__(self) -> int:
        return len(self._runs)

    def add(self, turn_id: str, task: asyncio.Task[Any]) -> Run:
        """Register a run; one whose cancel already arrived is stopped at once."""
        run = Run(turn_id, task)
        self._runs[turn_id] = run
        if self._cancelled.pop(turn_id, None) is not None:
            run.stop(StopReason.CANCEL)
        return run

    def cancel(self, turn_id: str) -> None:
        """A cancel broadcast: stop the run, or remember it for a run about to start."""
        if self.stop(turn_id, StopReason.CANCEL):
            return
        now = time.monotonic()
        self._cancelled[turn_id] = now
        while self._cancelled and (
            len(self._cancelled) > CANCEL_MEMORY_SIZE
            or next(iter(self._cancelled.values())) < now - CANCEL_MEMORY_SECONDS
        ):
            self._cancelled.popitem(last=False)

    def remove(self, turn_id: str) -> None:
        self._runs.pop(turn_id, None)

    def stop(self, turn_id: str, reason: StopReason) -> bool:
        run = self._runs.get(turn_id)
        if run is None:
            return False
        run.stop(reason)
        return True

    def stop_all(self, reason: StopReason) -> None:
        for run in list(self._runs.values()):
            run.stop(reason)
