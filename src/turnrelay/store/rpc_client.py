"""``RpcExecutorStore``: the executor's store port, through ``turnrelay db-manager``.

Every call may be sent more than once, and is: a refused connection, a
timeout, a 502/503/504 from a load balancer, or the database being briefly
down (``BackendUnavailable`` from the service) are retried with backoff for up
to ``retry_for`` seconds, then raised as ``BackendUnavailable``, which the
executor already handles as it does a direct database outage. A write makes
its call id once and sends it with every retry, so the service runs it at most
once and a retried finish that won answers "won". Any other error of the tree
is raised as the class the service raised.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import httpx

from turnrelay.errors import BackendUnavailable, SchemaOutOfDate
from turnrelay.store.base import (
    ApprovalRecord,
    MessageRecord,
    NewApproval,
    Steer,
    TurnOutcome,
    TurnPause,
    TurnRecord,
    WebhookDelivery,
)
from turnrelay.store.rpc import (
    CALL_ID_HEADER,
    METHODS,
    ClaimWebhooks,
    DispatchedActive,
    DispatchNext,
    ExpireApprovals,
    FinishTurn,
    History,
    NoParams,
    Params,
    PauseTurn,
    SavePartial,
    SessionId,
    SetCliSession,
    SettleWebhook,
    StartTurn,
    TakeSteers,
    TurnId,
    UndispatchedHeads,
    UnpublishedHeads,
    error_from_wire,
)

log = logging.getLogger(__name__)

# One attempt's time limit; a call's retries end after ``retry_for``.
CALL_TIMEOUT_S = 15.0
RETRY_FOR_S = 30.0
_RETRY_STATUSES = (502, 503, 504)


class RpcExecutorStore:
    """``ExecutorStore`` over HTTP to the db-manager at ``url``."""

    def __init__(
        self,
        url: str,
        *,
        secret: str | None = None,
        retry_for: float = RETRY_FOR_S,
        timeout: float = CALL_TIMEOUT_S,
        max_connections: int = 100,
    ) -> None:
        self._url = url.rstrip("/")
        self._headers = {"authorization": f"Bearer {secret}"} if secret else {}
        self._retry_for = retry_for
        self._timeout = timeout
        self._max_connections = max_connections
        self._http: httpx.AsyncClient | None = None

    async def startup(self) -> None:
        if self._http is not None:
            return
        self._http = httpx.AsyncClient(
            base_url=self._url,
            headers=self._headers,
            timeout=self._timeout,
            limits=httpx.Limits(
                max_connections=self._max_connections,
                max_keepalive_connections=self._max_connections,
            ),
        )
        await self._check_schema()
        await self.ping()  # with the secret: a wrong one stops the executor here

    async def shutdown(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    async def _check_schema(self) -> None:
        """The db-manager serves the schema this code was written for, or the
        executor refuses to start (as it does on a direct database)."""
        from turnrelay.store.migrate import head_revision

        response = await self._send("GET", "/health", None, {})
        served = response.json().get("schema")
        if served != head_revision():
            raise SchemaOutOfDate(
                f"the db-manager at {self._url} serves schema {served}, this executor needs "
                f"{head_revision()}: run the same turnrelay version on both"
            )

    # transport -------------------------------------------------------------------------

    async def _call(self, method: str, params: Params) -> Any:
        spec = METHODS[method]
        headers = {"content-type": "application/json"}
        if spec.write:
            headers[CALL_ID_HEADER] = uuid.uuid4().hex
        response = await self._send(
            "POST", f"/rpc/{method}", params.model_dump_json().encode(), headers
        )
        return spec.result.validate_python(response.json()["result"])

    async def _send(
        self, verb: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> httpx.Response:
        if self._http is None:
            raise RuntimeError("RpcExecutorStore used before startup()")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_for
        delay = 0.05
        while True:
            problem: str
            try:
                response = await self._http.request(verb, path, content=body, headers=headers)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return response
                error = error_from_wire(_json(response), response.status_code)
                if not isinstance(error, BackendUnavailable) and (
                    response.status_code not in _RETRY_STATUSES or _json(response) is not None
                ):
                    raise error
                problem = error.detail
            if loop.time() + delay > deadline:
                raise BackendUnavailable(f"db-manager at {self._url} unavailable: {problem}")
            log.info("db-manager %s %s: %s; retrying in %.2fs", verb, path, problem, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    # the port --------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._call("ping", NoParams())

    async def history(self, session_id: str, before_seq: int) -> list[MessageRecord]:
        result: list[MessageRecord] = await self._call(
            "history", History(session_id=session_id, before_seq=before_seq)
        )
        return result

    async def get_turn(self, turn_id: str) -> TurnRecord:
        result: TurnRecord = await self._call("get_turn", TurnId(turn_id=turn_id))
        return result

    async def cli_session(self, session_id: str) -> str | None:
        result: str | None = await self._call("cli_session", SessionId(session_id=session_id))
        return result

    async def set_cli_session(self, session_id: str, cli_session_id: str) -> None:
        await self._call(
            "set_cli_session",
            SetCliSession(session_id=session_id, cli_session_id=cli_session_id),
        )

    async def dispatch_next(
        self,
        session_id: str,
        *,
        republish_before: datetime | None = None,
        max_running_per_user: int | None = None,
    ) -> TurnRecord | None:
        result: TurnRecord | None = await self._call(
            "dispatch_next",
            DispatchNext(
                session_id=session_id,
                republish_before=republish_before,
                max_running_per_user=max_running_per_user,
            ),
        )
        return result

    async def mark_published(self, turn_id: str) -> None:
        await self._call("mark_published", TurnId(turn_id=turn_id))

    async def unpublished_heads(self, before: datetime, limit: int = 100) -> list[TurnRecord]:
        result: list[TurnRecord] = await self._call(
            "unpublished_heads", UnpublishedHeads(before=before, limit=limit)
        )
        return result

    async def undispatched_heads(self, limit: int = 100) -> list[TurnRecord]:
        result: list[TurnRecord] = await self._call(
            "undispatched_heads", UndispatchedHeads(limit=limit)
        )
        return result

    async def dispatched_active(
        self, limit: int = 500, *, running_only: bool = False
    ) -> list[TurnRecord]:
        result: list[TurnRecord] = await self._call(
            "dispatched_active", DispatchedActive(limit=limit, running_only=running_only)
        )
        return result

    async def start_turn(self, turn_id: str, attempt: int) -> TurnRecord | None:
        result: TurnRecord | None = await self._call(
            "start_turn", StartTurn(turn_id=turn_id, attempt=attempt)
        )
        return result

    async def save_partial(
        self, turn_id: str, attempt: int, content: str, parts: Sequence[dict[str, Any]]
    ) -> bool:
        result: bool = await self._call(
            "save_partial",
            SavePartial(turn_id=turn_id, attempt=attempt, content=content, parts=list(parts)),
        )
        return result

    async def finish_turn(self, turn_id: str, attempt: int, outcome: TurnOutcome) -> bool:
        result: bool = await self._call(
            "finish_turn", FinishTurn(turn_id=turn_id, attempt=attempt, outcome=outcome)
        )
        return result

    async def claim_webhooks(self, limit: int, lease: float) -> list[WebhookDelivery]:
        result: list[WebhookDelivery] = await self._call(
            "claim_webhooks", ClaimWebhooks(limit=limit, lease=lease)
        )
        return result

    async def settle_webhook(
        self,
        delivery_id: str,
        attempt: int,
        *,
        delivered: bool,
        status_code: int | None,
        error: str | None,
        retry_in: float | None,
    ) -> None:
        await self._call(
            "settle_webhook",
            SettleWebhook(
                delivery_id=delivery_id,
                attempt=attempt,
                delivered=delivered,
                status_code=status_code,
                error=error,
                retry_in=retry_in,
            ),
        )

    async def pause_turn(
        self,
        turn_id: str,
        attempt: int,
        pause: TurnPause,
        approvals: Sequence[NewApproval],
        expires_at: datetime,
    ) -> bool:
        result: bool = await self._call(
            "pause_turn",
            PauseTurn(
                turn_id=turn_id,
                attempt=attempt,
                pause=pause,
                approvals=list(approvals),
                expires_at=expires_at,
            ),
        )
        return result

    async def take_steers(self, turn_id: str, attempt: int, step: int) -> list[Steer]:
        result: list[Steer] = await self._call(
            "take_steers", TakeSteers(turn_id=turn_id, attempt=attempt, step=step)
        )
        return result

    async def approvals(self, turn_id: str) -> list[ApprovalRecord]:
        result: list[ApprovalRecord] = await self._call("approvals", TurnId(turn_id=turn_id))
        return result

    async def expire_approvals(
        self, now: datetime, reason: str, limit: int = 100
    ) -> list[TurnRecord]:
        result: list[TurnRecord] = await self._call(
            "expire_approvals", ExpireApprovals(now=now, reason=reason, limit=limit)
        )
        return result


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
