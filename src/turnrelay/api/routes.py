"""The routes of ``/api/chat`` (DESIGN.md, "HTTP API")."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from turnrelay.api.auth import Authenticator
from turnrelay.api.body import read_body
from turnrelay.api.control import TurnControl
from turnrelay.api.cursor import pick_cursor
from turnrelay.api.hub import StreamHub, UserStreams
from turnrelay.api.schemas import (
    CANCEL_BODY_LIMIT,
    ActiveTurn,
    ApprovalsAnswer,
    ApprovalView,
    CancelAnswer,
    Health,
    Message,
    NotReady,
    Ready,
    SessionCreated,
    SessionDetail,
    SessionList,
    SessionSummary,
    SubmitBody,
    Turn,
    TurnAccepted,
    Usage,
    WebhookDeliveryAnswer,
    check_session_id,
    parse_approvals,
    parse_cancel,
    parse_submit,
)
from turnrelay.api.sse import done_only, sse_response, turn_frames
from turnrelay.errors import (
    ApprovalAlreadyAnswered,
    BackendUnavailable,
    BadRequest,
    Conflict,
    Gone,
    NotFound,
    SessionNotFound,
    TurnNotFound,
    TurnNotWaiting,
    TurnrelayError,
)
from turnrelay.events.base import EventLog
from turnrelay.events.chunks import is_pause, is_reset
from turnrelay.metrics import Metrics
from turnrelay.settings import Settings
from turnrelay.store.base import (
    ApprovalRecord,
    ChatStore,
    MessageRecord,
    SessionRecord,
    TurnRecord,
    WebhookDelivery,
)


def _session_summary(s: SessionRecord) -> SessionSummary:
    return SessionSummary(id=s.id, title=s.title, created_at=s.created_at, updated_at=s.updated_at)


def _message(m: MessageRecord) -> Message:
    return Message(
        id=m.id,
        turn_id=m.turn_id,
        role=m.role,
        content=m.content,
        parts=m.parts,
        status=m.status,
        created_at=m.created_at,
    )


def _webhook(d: WebhookDelivery) -> WebhookDeliveryAnswer:
    return WebhookDeliveryAnswer(
        id=d.id,
        url=d.url,
        event=d.payload.get("type"),
        status=d.status,
        attempts=d.attempts,
        last_status=d.last_status,
        last_error=d.last_error,
        next_attempt_at=d.next_attempt_at if d.status == "pending" else None,
        created_at=d.created_at,
        delivered_at=d.delivered_at,
    )


def _approval(a: ApprovalRecord) -> ApprovalView:
    return ApprovalView(
        approval_id=a.id,
        tool_call_id=a.call_id,
        tool_name=a.tool_name,
        input=a.input,
        status="waiting" if a.approved is None else "approved" if a.approved else "denied",
        reason=a.reason,
        requested_at=a.created_at,
        expires_at=a.expires_at,
        decided_at=a.decided_at,
    )


# An approvals body holds at most MAX_DECISIONS short decisions.
APPROVALS_BODY_LIMIT = 64 * 1024


def answer(model: BaseModel, status: int = 200) -> JSONResponse:
    """An answer shaped by its model (``api/schemas.py``): what the document says."""
    return JSONResponse(model.model_dump(mode="json", exclude_unset=False), status)


class ChatRoutes:
    def __init__(
        self,
        *,
        settings: Settings,
        store: ChatStore,
        events: EventLog,
        control: TurnControl,
        hub: StreamHub,
        auth: Authenticator,
        metrics: Metrics,
        readiness: Any,
    ) -> None:
        self.settings = settings
        self.store = store
        self.events = events
        self.control = control
        self.hub = hub
        self.auth = auth
        self.metrics = metrics
        self.readiness = readiness
        self.streams = UserStreams(settings.max_streams_per_user)

    # -- helpers -----------------------------------------------------------------------

    async def _session(self, request: Request) -> tuple[str, SessionRecord]:
        user = await self.auth.user_for(request)
        session_id = request.path_params["session_id"]
        if not check_session_id(session_id):
            raise SessionNotFound(f"session {session_id[:64]!r} not found")
        return user, await self.store.get_session(session_id, user)

    async def _turn_of(self, session: SessionRecord, turn_id: str) -> TurnRecord:
        if not check_session_id(turn_id):  # turn ids have the same uuid form
            raise TurnNotFound(f"turn {turn_id[:64]!r} not found")
        turn = await self.store.get_turn(turn_id)
        if turn.session_id != session.id:
            raise TurnNotFound(f"turn {turn_id!r} not found")
        return turn

    async def _replay_from(self, turn: TurnRecord, after: int, *, continuing: bool = False) -> bool:
        """Check that the stream can be replayed from ``after``; False when there
        is nothing after it (the cursor is the finished log's last frame, or a
        pause's, unless ``continuing``: the request that answers the pause
        waits for what follows it)."""
        try:
            info = await self.events.info(turn.id)
        except NotFound:
            if turn.status.active:
                # Not started yet, or the log was lost (Redis restarted empty) and
                # its executor restores it, beginning with a reset the reader
                # rebuilds from: the reader waits for it, whatever its cursor.
                return True
            raise Gone(f"the stream of turn {turn.id} has expired") from None
        if after == 0:
            return True  # from the first frame there is (a restarted log begins with a reset)
        if after > info.last_seq:
            raise Gone(f"cursor {turn.id}:{after} is no longer in the stream")
        if after < info.first_seq - 1 and not await self._begins_with_reset(turn.id):
            # Trimmed away. A log that was restarted (Redis lost it) begins with
            # a reset and a snapshot instead, which any older cursor rebuilds from.
            raise Gone(f"cursor {turn.id}:{after} is no longer in the stream")
        if after == info.last_seq and not continuing:
            # Nothing after the cursor: the end of a finished turn, or of a
            # turn's stream while it waits for approvals (until it goes on).
            return not (
                info.terminal or (turn.waiting and await self._ends_with_pause(turn.id, after))
            )
        return True

    async def _ends_with_pause(self, turn_id: str, seq: int) -> bool:
        frames = (await self.events.read({turn_id: seq - 1}, count=1)).get(turn_id) or []
        return bool(frames) and frames[0].seq == seq and is_pause(frames[0].data)

    async def _begins_with_reset(self, turn_id: str) -> bool:
        first = (await self.events.read({turn_id: 0}, count=1)).get(turn_id) or []
        return bool(first) and is_reset(first[0].data)

    async def _stream(
        self, user: str, turn: TurnRecord, after: int, *, continuing: bool = False
    ) -> Response:
        if self.hub.closed:
            raise BackendUnavailable("this API process is shutting down; retry")
        if not await self._replay_from(turn, after, continuing=continuing):
            return sse_response(done_only(), {"x-turn-id": turn.id})
        release = self.streams.open(user)
        body = turn_frames(
            self.hub,
            turn.id,
            after,
            heartbeat=self.settings.heartbeat_interval,
            metrics=self.metrics,
            release=release,
            waiting=functools.partial(self._waiting, turn.id),
        )
        return sse_response(body, {"x-turn-id": turn.id}, background=BackgroundTask(release))

    async def _waiting(self, turn_id: str) -> bool:
        return (await self.store.get_turn(turn_id)).waiting

    # -- sessions ----------------------------------------------------------------------

    async def create_session(self, request: Request) -> Response:
        user = await self.auth.user_for(request)
        s = await self.store.create_session(user)
        return answer(SessionCreated(id=s.id, created_at=s.created_at, user_id=s.user_id), 201)

    async def list_sessions(self, request: Request) -> Response:
        user = await self.auth.user_for(request)
        limit = _int_param(request, "limit", 50, 1, 100)
        offset = _int_param(request, "offset", 0, 0, 10**9)
        sessions, total = await self.store.list_sessions(user, limit=limit, offset=offset)
        return answer(SessionList(sessions=[_session_summary(s) for s in sessions], total=total))

    async def get_session(self, request: Request) -> Response:
        _, s = await self._session(request)
        # Active turns first: a turn that ends between the two reads then shows as
        # active with its final messages (a reader resumes and gets its end at
        # once), never as a "running" message with no active turn to resume.
        active = await self.store.active_turns(s.id)
        messages = await self.store.messages(s.id)
        active_turn = None
        if active:
            head = next((t for t in active if t.status.value == "running"), active[0])
            last_event_id = None
            try:
                info = await self.events.info(head.id)
                if info.last_seq:
                    last_event_id = f"{head.id}:{info.last_seq}"
            except NotFound:
                pass
            active_turn = ActiveTurn(
                turn_id=head.id,
                status=head.status,
                started_at=head.started_at,
                last_event_id=last_event_id,
                queue_position=await self.store.queue_position(head),
                waiting_for_approval=head.waiting,
            )
        return answer(
            SessionDetail(
                id=s.id,
                title=s.title,
                created_at=s.created_at,
                updated_at=s.updated_at,
                user_id=s.user_id,
                messages=[_message(m) for m in messages],
                active_turn=active_turn,
            )
        )

    async def delete_session(self, request: Request) -> Response:
        user, s = await self._session(request)
        await self.control.delete(s.id, user)
        return Response(status_code=204)

    # -- turns -------------------------------------------------------------------------

    async def _submit(self, request: Request) -> tuple[TurnRecord, bool]:
        """The submitted turn, and whether the request continues a paused one
        (the AI SDK's approval responses) rather than starting a turn."""
        # The submit transaction checks the session's owner itself; the separate
        # lookup only runs when the body is bad, so another user's session still
        # answers 404 before any 400 about the body.
        user = await self.auth.user_for(request)
        session_id = request.path_params["session_id"]
        if not check_session_id(session_id):
            raise SessionNotFound(f"session {session_id[:64]!r} not found")
        try:
            body = parse_submit(
                await read_body(request), max_message_bytes=self.settings.max_message_bytes
            )
            model = self.control.resolve_model(body.model)
        except TurnrelayError:
            await self.store.get_session(session_id, user)
            raise
        if body.continues is not None:
            return await self._continue(session_id, user, body), True
        result = await self.control.submit(
            session_id,
            user,
            body.message,
            model=model,
            message_id=body.message_id,
            multitask=body.multitask,
            webhook_url=body.webhook_url,
            regenerate=body.regenerate,
            replaces=body.replaces,
        )
        return result.turn, False

    async def _continue(self, session_id: str, user: str, body: SubmitBody) -> TurnRecord:
        """Record the approval responses of the chat's last (assistant) message
        on the turn that wrote it; the turn then goes on (or already did)."""
        assert body.continues is not None
        await self.store.get_session(session_id, user)
        turn = await self.store.turn_for_message(session_id, body.continues)
        if turn.paused is None:
            raise TurnNotWaiting(
                f"turn {turn.id} asked for no approval; send a user message to go on"
            )
        if body.decisions and turn.waiting:
            try:
                answered = await self.control.answer_approvals(session_id, turn.id, body.decisions)
                turn = answered.turn
            except (ApprovalAlreadyAnswered, TurnNotWaiting):
                # Decided already (a timeout, another tab): the stream shows how.
                turn = await self.store.get_turn(turn.id)
        if turn.waiting:
            raise Conflict(
                f"turn {turn.id} still waits for {turn.pending_approvals} approval "
                "response(s): answer every request of the message",
                code="approvals_pending",
            )
        return turn

    async def post_stream(self, request: Request) -> Response:
        turn, continuing = await self._submit(request)
        if continuing:
            assert turn.paused is not None
            return await self._stream(turn.user_id, turn, turn.paused.seq, continuing=True)
        return await self._stream(turn.user_id, turn, 0)

    async def post_turn(self, request: Request) -> Response:
        turn, _ = await self._submit(request)
        position = await self.store.queue_position(turn)
        return answer(
            TurnAccepted(turn_id=turn.id, status=turn.status, queue_position=position), 202
        )

    async def post_approvals(self, request: Request) -> Response:
        _, s = await self._session(request)
        turn = await self._turn_of(s, request.path_params["turn_id"])
        decisions = parse_approvals(await read_body(request, limit=APPROVALS_BODY_LIMIT))
        result = await self.control.answer_approvals(s.id, turn.id, decisions)
        return answer(
            ApprovalsAnswer(
                turn_id=turn.id,
                status=result.turn.status,
                waiting=result.turn.waiting,
                approvals=[_approval(a) for a in result.approvals],
            )
        )

    async def get_turn(self, request: Request) -> Response:
        _, s = await self._session(request)
        turn = await self._turn_of(s, request.path_params["turn_id"])
        deliveries = await self.store.webhook_deliveries(turn.id)
        return answer(
            Turn(
                turn_id=turn.id,
                status=turn.status,
                attempt=turn.attempt,
                error=turn.error,
                model=turn.model,
                created_at=turn.created_at,
                started_at=turn.started_at,
                finished_at=turn.finished_at,
                usage=Usage.model_validate(turn.usage) if turn.usage else None,
                superseded_by=turn.superseded_by,
                steered_into=turn.steered_into,
                queue_position=await self.store.queue_position(turn),
                webhooks=[_webhook(d) for d in deliveries],
                waiting_for_approval=turn.waiting,
                approvals=[_approval(a) for a in await self.store.approvals(turn.id)],
            )
        )

    async def get_stream(self, request: Request) -> Response:
        user, s = await self._session(request)
        cursor = pick_cursor(
            request.headers.get("last-event-id"), request.query_params.get("after")
        )
        turn_param = request.query_params.get("turn_id")
        if cursor is not None:
            if turn_param is not None and turn_param != cursor.turn_id:
                raise BadRequest(
                    "?turn_id= and the cursor name different turns", code="invalid_cursor"
                )
            turn = await self._turn_of(s, cursor.turn_id)
            return await self._stream(user, turn, cursor.seq)
        if turn_param is not None:
            turn = await self._turn_of(s, turn_param)
            return await self._stream(user, turn, 0)
        active = await self.store.active_turns(s.id)
        if not active:
            return Response(status_code=204)
        head = next((t for t in active if t.status.value == "running"), active[0])
        return await self._stream(user, head, 0)

    async def cancel(self, request: Request) -> Response:
        user, s = await self._session(request)
        turn_id = parse_cancel(await read_body(request, limit=CANCEL_BODY_LIMIT))
        if turn_id is not None:
            await self._turn_of(s, turn_id)  # 404 for a turn of another session
        result = await self.control.cancel(s.id, user, turn_id)
        reason = {"reason": result.reason} if result.reason else {}
        body = CancelAnswer(cancelled=result.cancelled, turn_id=result.turn_id, **reason)
        # ``reason`` only when there is one (unset fields are left out)
        return JSONResponse(
            body.model_dump(mode="json", exclude_unset=True),
            202 if result.reason == "timeout" else 200,
        )

    # -- operations ----------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return answer(Health(status="ok"))

    async def ready(self, request: Request) -> Response:
        try:
            await self.readiness()
        except BackendUnavailable as exc:
            return answer(NotReady(status="unavailable", detail=exc.detail, code=exc.code), 503)
        return answer(Ready(status="ready"))

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    # ASCII digits only: ``int()`` would also take " 5", "+5", "1_0" and other scripts' digits.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 12):
        raise BadRequest(f"`{name}` must be a non-negative integer", code="invalid_param")
    value = int(raw)
    if not lo <= value <= hi:
        raise BadRequest(f"`{name}` must be between {lo} and {hi}", code="invalid_param")
    return value
