"""Reading a request body under a size limit, while it arrives.

A body is never held whole before it is measured: a ``Content-Length`` over the
limit is refused before a byte is read, and any other body (chunked, or one whose
``Content-Length`` lies) is counted as it is received and refused the moment it
passes the limit. The API's memory per request is therefore bounded by the
limit, whatever a client sends. Every route that reads a body reads it here.
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

from turnrelay.errors import BadRequest, PayloadTooLarge

# A DefaultChatTransport body carries the whole history of the chat.
MAX_BODY_BYTES = 4 * 1024 * 1024


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, at most ``limit`` bytes: ``PayloadTooLarge`` beyond it,
    ``BadRequest`` for a malformed ``Content-Length`` or a body that ends
    before it."""
    declared = _content_length(request)
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body over {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest(
            "the connection closed before the request body ended", code="incomplete_body"
        ) from None
    if declared is not None and size != declared:
        raise BadRequest(
            f"the request body has {size} bytes but its Content-Length says {declared}",
            code="incomplete_body",
        )
    return b"".join(chunks)


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    value = raw.strip()
    if not value.isdigit() or not value.isascii():
        raise BadRequest(
            f"Content-Length must be a number of bytes, got {raw[:40]!r}",
            code="invalid_content_length",
        )
    return int(value)
