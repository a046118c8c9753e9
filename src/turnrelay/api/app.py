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
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from turnrelay.api import errors
from turnrelay.api.auth import Authenticator
from turnrelay.api.control import TurnControl
from turnrelay.api.docs import DocsRoutes
from turnrelay.api.hub import StreamHub
from turnrelay.api.jwt_auth import JwtVerifier
from turnrelay.api.openapi import OPERATIONS, openapi_document
from turnrelay.api.routes import ChatRoutes
from turnrelay.errors import TurnrelayError
from turnrelay.events.base import EventLog
from turnrelay.metrics import Metrics
from turnrelay.queue.base import TurnQueue
from turnrelay.settings import Settings
from turnrelay.storage.base import ObjectStore
from turnrelay.store.base import ChatStore

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def create_app(
    *,
    settings: Settings,
    store: ChatStore,
    events: EventLog,
    queue: TurnQueue,
    metrics: Metrics,
    objects: ObjectStore,
    readiness: Callable[[], Awaitable[None]],
) -> Starlette:
    hub = StreamHub(events)
    control = TurnControl(
        settings=settings,
        store=store,
        events=events,
        queue=queue,
        metrics=metrics,
        hub=hub,
        objects=objects,
    )
    r = ChatRoutes(
        settings=settings,
        store=store,
        events=events,
        control=control,
        hub=hub,
        auth=authenticator(settings),
        metrics=metrics,
        readiness=readiness,
    )
    document = openapi_document(settings)
    docs = DocsRoutes(document)
    # One route per path, so a method the path lacks answers 405 with an
    # ``Allow`` header naming all of the path's methods.
    table: dict[str, dict[str, Handler]] = {}
    for op in OPERATIONS:  # the documented routes are the routes
        owner: Any = docs if op.tag == "docs" else r
        table.setdefault(op.path, {})[op.method.upper()] = getattr(owner, op.handler)
    routes: list[Any] = [
        Route(path, by_method(handlers), methods=list(handlers)) for path, handlers in table.items()
    ]
    if (WEB_DIR / "index.html").exists():
        routes.append(PageMount("/", StaticFiles(directory=WEB_DIR, html=True), name="web"))

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


Handler = Callable[[Request], Awaitable[Response]]


class PageMount(Mount):
    """The static pages, for GET and HEAD outside ``/api/`` only: mounted at
    ``/`` they would otherwise match every request, and answer a method an API
    path lacks with their own 405 or 404 instead of the route's 405 (whose
    ``Allow`` names the path's methods)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and (
            scope["method"] not in ("GET", "HEAD") or scope["path"].startswith("/api/")
        ):
            return Match.NONE, {}
        return super().matches(scope)


def by_method(handlers: dict[str, Handler]) -> Handler:
    """The endpoint of one path: each method's handler (HEAD is GET's)."""

    async def endpoint(request: Request) -> Response:
        handler = handlers["GET" if request.method == "HEAD" else request.method]
        request.scope["endpoint"] = handler  # what RequestMetrics labels the request by
        return await handler(request)

    return endpoint


def authenticator(settings: Settings) -> Authenticator:
    verifier = None
    if settings.jwt_enabled():
        verifier = JwtVerifier(
            secret=settings.jwt_secret,
            jwks_url=settings.jwt_jwks_url,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            user_claim=settings.jwt_user_claim,
            leeway=settings.jwt_leeway,
            jwks_refetch=settings.jwt_jwks_refetch,
        )
    return Authenticator(settings.user_tokens(), verifier)
