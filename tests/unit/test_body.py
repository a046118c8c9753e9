"""``read_body``: the size limit holds while the body arrives, and a body that
does not match its ``Content-Length`` is a bad request (ASGI messages by hand,
for the cases an HTTP server would not let through)."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.requests import Request

from turnrelay.api.body import read_body
from turnrelay.errors import BadRequest, PayloadTooLarge


class Feed:
    """An ASGI ``receive`` that hands out body pieces and counts what was taken."""

    def __init__(self, pieces: list[bytes], *, disconnect: bool = False) -> None:
        self.pieces = pieces
        self.disconnect = disconnect
        self.taken = 0

    async def __call__(self) -> dict[str, Any]:
        if self.taken == len(self.pieces):
            if self.disconnect:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": b"", "more_body": False}
        piece = self.pieces[self.taken]
        self.taken += 1
        more = self.disconnect or self.taken < len(self.pieces)
        return {"type": "http.request", "body": piece, "more_body": more}


def _request(feed: Feed, content_length: str | None) -> Request:
    headers = [] if content_length is None else [(b"content-length", content_length.encode())]
    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    return Request(scope, feed)


async def test_a_body_within_the_limit_is_read_whole() -> None:
    feed = Feed([b"ab", b"cd"])
    assert await read_body(_request(feed, "4"), limit=4) == b"abcd"
    assert await read_body(_request(Feed([b"ab", b"cd"]), None), limit=4) == b"abcd"


async def test_a_declared_oversize_is_refused_before_reading() -> None:
    feed = Feed([b"x" * 10])
    with pytest.raises(PayloadTooLarge):
        await read_body(_request(feed, "11"), limit=10)
    assert feed.taken == 0


@pytest.mark.parametrize("declared", [None, "4"])
async def test_reading_stops_at_the_limit(declared: str | None) -> None:
    # chunked (no Content-Length), or a Content-Length that lies about the size
    feed = Feed([b"x" * 4] * 100)
    with pytest.raises(PayloadTooLarge):
        await read_body(_request(feed, declared), limit=10)
    assert feed.taken == 3  # the piece that crossed the limit is the last one taken


@pytest.mark.parametrize("declared", ["12", "3"])
async def test_a_body_that_does_not_match_its_length_is_a_bad_request(declared: str) -> None:
    with pytest.raises(BadRequest) as caught:
        await read_body(_request(Feed([b"abcd"]), declared), limit=100)
    assert caught.value.code == "incomplete_body"


async def test_a_disconnect_mid_body_is_a_bad_request() -> None:
    with pytest.raises(BadRequest) as caught:
        await read_body(_request(Feed([b"ab"], disconnect=True), "10"), limit=100)
    assert caught.value.code == "incomplete_body"


@pytest.mark.parametrize("raw", ["twelve", "-1", "1e3", "4, 4", "", "٤"])
async def test_a_malformed_content_length_is_a_bad_request(raw: str) -> None:
    with pytest.raises(BadRequest) as caught:
        await read_body(_request(Feed([b"abcd"]), raw), limit=100)
    assert caught.value.code == "invalid_content_length"
