"""``turnrelay db-manager``: the executor's store port served over HTTP.

Executors call it instead of opening database connections of their own, so
PostgreSQL sees this service's one bounded pool however many executors run.
Each request is checked in this order, and stops at the first failure:

1. the shared secret (``authorization: Bearer …``), compared in constant
   time before a byte of the body is read: 401;
2. the method, from ``turnrelay.store.rpc.METHODS``: 404 (405 for a GET);
3. the body, read under ``MAX_BODY_BYTES`` (413) and validated against the
   method's parameter model (422), and a write's call id (422 without one);
4. the call, on ``SqlChatStore`` with the call id, so a repeated write answers
   what the first did. Errors of the tree go back as ``{detail, code, error}``
   with their status; anything else is logged and answered 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from turnrelay.api.body import read_body
from turnrelay.api.errors import error_response
from turnrelay.errors import TurnrelayError, Unauthorized, Unprocessable
from turnrelay.metrics import Metrics
from turnrelay.store.migrate import head_revision
from turnrelay.store.rpc import CALL_ID, CALL_ID_HEADER, MAX_BODY_BYTES, METHODS, error_to_wire
from turnrelay.store.sql import SqlChatStore

log = logging.getLogger(__name__)

# Recorded call ids are kept this long: far longer than a client retries one call.
CALL_RETENTION = timedelta(hours=1)
PRUNE_EVERY_S = 300.0


def _error(exc: TurnrelayError) -> JSONResponse:
    body = error_to_wire(exc)
    return error_response(exc.status, body.pop("code"), body.pop("detail"), **body)


def create_app(store: SqlChatStore, *, secret: str | None, metrics: Metrics) -> Starlette:
    expected = f"Bearer {secret}".encode() if secret else None
    schema = head_revision()

    def authorised(request: Request) -> bool:
        if expected is None:
            return True
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, expected)

    async def call(request: Request) -> Response:
        name = request.path_params["method"]
        began = time.perf_counter()
        try:
            response = await _call(request, name)
        except TurnrelayError as exc:
            if exc.status >= 500:
                log.warning("%s: %s", name, exc.detail)
            response = _error(exc)
        except Exception:
            log.exception("%s: unexpected error", name)
            response = _error(TurnrelayError("internal error"))
        label = name if name in METHODS else "unknown"
        metrics.rpc_call(label, response.status_code, time.perf_counter() - began)
        return response

    async def _call(request: Request, name: str) -> Response:
        if not authorised(request):
            raise Unauthorized("missing or wrong db-manager secret", code="bad_secret")
        method = METHODS.get(name)
        if method is None:
            return error_response(404, "unknown_method", f"no method {name!r}")
        call_id = request.headers.get(CALL_ID_HEADER)
        if method.write:
            if call_id is None:
                raise Unprocessable(
                    f"{name} is a write: it needs an {CALL_ID_HEADER} header", code="no_call_id"
                )
            try:
                CALL_ID.validate_python(call_id)
            except ValidationError:
                raise Unprocessable(
                    f"{CALL_ID_HEADER} must be 16-64 characters of [A-Za-z0-9_-]",
                    code="invalid_call_id",
                ) from None
        raw = await read_body(request, MAX_BODY_BYTES)
        try:
            params = method.params.model_validate_json(raw or b"{}")
        except ValidationError as exc:
            raise Unprocessable(_summary(exc), code="invalid_params") from None
        fn = getattr(store, name)
        kwargs = params.arguments()
        if method.write:
            kwargs["call_id"] = call_id
        result = await fn(**kwargs)
        return Response(
            b'{"result":' + method.result.dump_json(result) + b"}",
            media_type="application/json",
        )

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "schema": schema})

    async def ready(request: Request) -> Response:
        try:
            await store.ping()
        except TurnrelayError as exc:
            return error_response(503, "not_ready", exc.detail)
        return JSONResponse({"status": "ready", "schema": schema})

    async def render_metrics(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.startup()
        pruner = asyncio.create_task(_prune_forever(store), name="prune-calls")
        try:
            yield
        finally:
            pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pruner
            await store.shutdown()

    return Starlette(
        routes=[
            Route("/rpc/{method}", call, methods=["POST"]),
            Route("/health", health),
            Route("/ready", ready),
            Route("/metrics", render_metrics),
        ],
        lifespan=lifespan,
    )


async def _prune_forever(store: SqlChatStore) -> None:
    while True:
        try:
            pruned = await store.prune_calls(datetime.now(UTC) - CALL_RETENTION)
            if pruned:
                log.info("forgot %d recorded calls older than %s", pruned, CALL_RETENTION)
        except TurnrelayError as exc:
            log.warning("pruning recorded calls: %s", exc.detail)
        await asyncio.sleep(PRUNE_EVERY_S)


def _summary(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        problems.append(f"{where}: {error['msg']}")
    return "invalid parameters: " + "; ".join(problems)
