"""The ASGI app factory: routes, error mapping, CORS, the static chat page."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from turnrelay.api import errors
from turnrelay.api.auth import Authenticator
from turnrelay.api.control import TurnControl
from turnrelay.api.hub import StreamHub
from turnrelay.api.routes import ChatRoutes
from turnrelay.errors import TurnrelayError
from turnrelay.events.base import EventLog
from turnrelay.metrics import Metrics
from turnrelay.queue.base import TurnQueue
from turnrelay.settings import Settings
from turnrelay.store.base import ChatStore

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def create_app(
    *,
    settings: Settings,
    store: ChatStore,
    events: EventLog,
    queue: TurnQueue,
    metrics: Metrics,
    readiness: Callable[[], Awaitable[None]],
) -> Starlette:
    hub = StreamHub(events)
    control = TurnControl(
        settings=settings, store=store, events=events, queue=queue, metrics=metrics, hub=hub
    )
    r = ChatRoutes(
        settings=settings,
        store=store,
        events=events,
        control=control,
        hub=hub,
        auth=Authenticator(settings.user_tokens()),
        metrics=metrics,
        readiness=readiness,
    )
    prefix = "/api/chat"
    sid = "/sessions/{session_id}"
    routes: list[Any] = [
        Route(f"{prefix}/sessions", r.create_session, methods=["POST"]),
        Route(f"{prefix}/sessions", r.list_sessions, methods=["GET"]),
        Route(f"{prefix}{sid}", r.get_session, methods=["GET"]),
        Route(f"{prefix}{sid}", r.delete_session, methods=["DELETE"]),
        Route(f"{prefix}{sid}/stream", r.post_stream, methods=["POST"]),
        Route(f"{prefix}{sid}/stream", r.get_stream, methods=["GET"]),
        Route(f"{prefix}{sid}/turns", r.post_turn, methods=["POST"]),
        Route(f"{prefix}{sid}/turns/{{turn_id}}", r.get_turn, methods=["GET"]),
        Route(f"{prefix}{sid}/cancel", r.cancel, methods=["POST"]),
        Route("/health", r.health, methods=["GET"]),
        Route("/ready", r.ready, methods=["GET"]),
        Route("/metrics", r.metrics_text, methods=["GET"]),
    ]
    if (WEB_DIR / "index.html").exists():
        routes.append(Mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web"))

    middleware = [Middleware(RequestMetrics, metrics=metrics)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["authorization", "content-type", "last-event-id"],
                expose_headers=["x-turn-id", "x-vercel-ai-ui-message-stream"],
            )
        )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()

    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            TurnrelayError: errors.turnrelay_error,
            HTTPException: errors.http_error,
            Exception: errors.unexpected_error,
        },
        lifespan=lifespan,
    )
    app.state.hub = hub
    return app


class RequestMetrics:
    """Counts every request by route template and status, in one place."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            endpoint = scope.get("endpoint")
            name = getattr(endpoint, "__name__", None) or "unmatched"
            self._metrics.http_requests.labels(name, str(status)).inc()
