"""The turns this executor is running, so a cancel broadcast can reach them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum


class StopReason(StrEnum):
    CANCEL = "cancel"  # a user asked: end the turn ``cancelled`` with its partial answer
    LEASE_LOST = "lease_lost"  # another executor owns the session now: write nothing
    SHUTDOWN = "shutdown"  # this executor is stopping: write nothing, leave it to a retry


@dataclass
class Run:
    turn_id: str
    task: asyncio.Task[None]
    reason: StopReason | None = field(default=None)

    def stop(self, reason: StopReason) -> None:
        if self.reason is None:
            self.reason = reason
        self.task.cancel()


class RunningTurns:
    def __init__(self) -> None:
        self._runs: dict[str, Run] = {}

    def __len__(self) -> int:
        return len(self._runs)

    def add(self, turn_id: str, task: asyncio.Task[None]) -> Run:
        run = Run(turn_id, task)
        self._runs[turn_id] = run
        return run

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
