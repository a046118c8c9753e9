"""The one place the error tree becomes HTTP answers: ``{detail, code}``."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from turnrelay.errors import RateLimited, TurnAlreadyActive, TurnrelayError

log = logging.getLogger(__name__)


def error_response(
    status: int,
    code: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
    *,
    retry_after: int = 1,
    **extra: object,
) -> JSONResponse:
    retry = {"retry-after": str(retry_after)} if status in (429, 503) else {}
    headers = {**(headers or {}), **retry}
    return JSONResponse({"detail": detail, "code": code, **extra}, status, headers=headers)


async def turnrelay_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TurnrelayError)
    extra: dict[str, object] = {}
    if isinstance(exc, TurnAlreadyActive):
        extra["turn_id"] = exc.turn_id
    status = exc.status if exc.status != 500 else 500
    if status >= 500 and not isinstance(exc, RateLimited):
        log.warning("%s %s: %s", request.method, request.url.path, exc.detail)
    detail = exc.detail if status < 500 or status == 503 else "internal error"
    retry_after = exc.retry_after if isinstance(exc, RateLimited) else 1
    return error_response(status, exc.code, detail, None, retry_after=retry_after, **extra)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    # Its headers too: a 405 names the path's methods in ``Allow``.
    return error_response(
        exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail), exc.headers
    )


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path)
    return error_response(500, "internal_error", "internal error")
