"""The routes of ``/api/chat`` (DESIGN.md, "HTTP API")."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from turnrelay.api.auth import Authenticator
from turnrelay.api.body import read_body
from turnrelay.api.control import TurnControl
from turnrelay.api.cursor import pick_cursor
from turnrelay.api.hub import StreamHub, UserStreams
from turnrelay.api.schemas import CANCEL_BODY_LIMIT, check_session_id, parse_cancel, parse_submit
from turnrelay.api.sse import done_only, sse_response, turn_frames
from turnrelay.errors import (
    BackendUnavailable,
    BadRequest,
    Gone,
    NotFound,
    SessionNotFound,
    TurnNotFound,
    TurnrelayError,
)
from turnrelay.events.base import EventLog
from turnrelay.events.chunks import is_reset
from turnrelay.metrics import Metrics
from turnrelay.settings import Settings
from turnrelay.store.base import ChatStore, MessageRecord, SessionRecord, TurnRecord


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _session_json(s: SessionRecord) -> dict[str, Any]:
    return {
        "id": s.id,
        "title": s.title,
        "created_at": _iso(s.created_at),
        "updated_at": _iso(s.updated_at),
    }


def _message_json(m: MessageRecord) -> dict[str, Any]:
    return {
        "id": m.id,
        "turn_id": m.turn_id,
        "role": m.role,
        "content": m.content,
        "parts": m.parts,
        "status": m.status.value,
        "created_at": _iso(m.created_at),
    }


def _turn_json(t: TurnRecord) -> dict[str, Any]:
    return {
        "turn_id": t.id,
        "status": t.status.value,
        "attempt": t.attempt,
        "error": t.error,
        "model": t.model,
        "created_at": _iso(t.created_at),
        "started_at": _iso(t.started_at),
        "finished_at": _iso(t.finished_at),
        "usage": t.usage,
    }


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
        user = self.auth.user_for(request)
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

    async def _replay_from(self, turn: TurnRecord, after: int) -> bool:
        """Check that the stream can be replayed from ``after``; False when there
        is nothing after it (the cursor is the finished log's last frame)."""
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
        return not (info.terminal and after == info.last_seq)

    async def _begins_with_reset(self, turn_id: str) -> bool:
        first = (await self.events.read({turn_id: 0}, count=1)).get(turn_id) or []
        return bool(first) and is_reset(first[0].data)

    async def _stream(self, user: str, turn: TurnRecord, after: int) -> Response:
        if self.hub.closed:
            raise BackendUnavailable("this API process is shutting down; retry")
        if not await self._replay_from(turn, after):
            return sse_response(done_only(), {"x-turn-id": turn.id})
        release = self.streams.open(user)
        body = turn_frames(
            self.hub,
            turn.id,
            after,
            heartbeat=self.settings.heartbeat_interval,
            metrics=self.metrics,
            release=release,
        )
        return sse_response(body, {"x-turn-id": turn.id}, background=BackgroundTask(release))

    # -- sessions ----------------------------------------------------------------------

    async def create_session(self, request: Request) -> Response:
        user = self.auth.user_for(request)
        s = await self.store.create_session(user)
        return JSONResponse(
            {"id": s.id, "created_at": _iso(s.created_at), "user_id": s.user_id}, 201
        )

    async def list_sessions(self, request: Request) -> Response:
        user = self.auth.user_for(request)
        limit = _int_param(request, "limit", 50, 1, 100)
        offset = _int_param(request, "offset", 0, 0, 10**9)
        sessions, total = await self.store.list_sessions(user, limit=limit, offset=offset)
        return JSONResponse({"sessions": [_session_json(s) for s in sessions], "total": total})

    async def get_session(self, request: Request) -> Response:
        _, s = await self._session(request)
        # Active turns first: a turn that ends between the two reads then shows as
        # active with its final messages (a reader resumes and gets its end at
        # once), never as a "running" message with no active turn to resume.
        active = await self.store.active_turns(s.id)
        messages = await self.store.messages(s.id)
        active_json = None
        if active:
            head = next((t for t in active if t.status.value == "running"), active[0])
            last_event_id = None
            try:
                info = await self.events.info(head.id)
                if info.last_seq:
                    last_event_id = f"{head.id}:{info.last_seq}"
            except NotFound:
                pass
            active_json = {
                "turn_id": head.id,
                "status": head.status.value,
                "started_at": _iso(head.started_at),
                "last_event_id": last_event_id,
            }
        return JSONResponse(
            {
                **_session_json(s),
                "user_id": s.user_id,
                "messages": [_message_json(m) for m in messages],
                "active_turn": active_json,
            }
        )

    async def delete_session(self, request: Request) -> Response:
        user, s = await self._session(request)
        await self.control.delete(s.id, user)
        return Response(status_code=204)

    # -- turns -------------------------------------------------------------------------

    async def _submit(self, request: Request) -> TurnRecord:
        # The submit transaction checks the session's owner itself; the separate
        # lookup only runs when the body is bad, so another user's session still
        # answers 404 before any 400 about the body.
        user = self.auth.user_for(request)
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
        result = await self.control.submit(
            session_id,
            user,
            body.message,
            model=model,
            message_id=body.message_id,
            multitask=body.multitask,
        )
        return result.turn

    async def post_stream(self, request: Request) -> Response:
        turn = await self._submit(request)
        return await self._stream(turn.user_id, turn, 0)

    async def post_turn(self, request: Request) -> Response:
        turn = await self._submit(request)
        return JSONResponse({"turn_id": turn.id, "status": turn.status.value}, 202)

    async def get_turn(self, request: Request) -> Response:
        _, s = await self._session(request)
        turn = await self._turn_of(s, request.path_params["turn_id"])
        return JSONResponse(_turn_json(turn))

    async def get_stream(self, request: Request) -> Response:
        user, s = await self._session(request)
        cursor = pick_cursor(
            request.headers.get("last-event-id"), request.query_params.get("after")
        )
        turn_param = request.query_params.get("turn_id")
        if cursor is not None:
            if turn_param and turn_param != cursor.turn_id:
                raise BadRequest(
                    "?turn_id= and the cursor name different turns", code="invalid_cursor"
                )
            turn = await self._turn_of(s, cursor.turn_id)
            return await self._stream(user, turn, cursor.seq)
        if turn_param:
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
        body: dict[str, Any] = {"cancelled": result.cancelled, "turn_id": result.turn_id}
        if result.reason:
            body["reason"] = result.reason
        return JSONResponse(body, 202 if result.reason == "timeout" else 200)

    # -- operations ----------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        try:
            await self.readiness()
        except BackendUnavailable as exc:
            return JSONResponse(
                {"status": "unavailable", "detail": exc.detail, "code": exc.code}, 503
            )
        return JSONResponse({"status": "ready"})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"`{name}` must be an integer", code="invalid_param") from None
    if not lo <= value <= hi:
        raise BadRequest(f"`{name}` must be between {lo} and {hi}", code="invalid_param")
    return value
