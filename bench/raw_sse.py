"""The baseline of bench/idle_streams.py: a raw Starlette SSE endpoint under
uvicorn with turnrelay's own uvicorn settings, no turnrelay code. `GET /stream`
sends one data frame, then a ping every HEARTBEAT seconds, until the client
goes away: what an idle turnrelay stream does, with nothing behind it.

    python -m bench.raw_sse --port PORT [--heartbeat 10]
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

HEADERS = {
    "x-vercel-ai-ui-message-stream": "v1",
    "cache-control": "no-cache, no-transform",
    "x-accel-buffering": "no",
    "connection": "keep-alive",
}


def app(heartbeat: float) -> Starlette:
    async def frames() -> AsyncIterator[bytes]:
        yield b'id: t:1\ndata: {"type":"text-delta","id":"0","delta":"t0"}\n\n'
        while True:
            await asyncio.sleep(heartbeat)
            yield b": ping\n\n"

    async def stream(request: Request) -> Response:
        return StreamingResponse(frames(), media_type="text/event-stream", headers=HEADERS)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/stream", stream), Route("/health", health)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--heartbeat", type=float, default=10.0)
    args = parser.parse_args()
    # The same Config as turnrelay's own server (turnrelay/cli.py: _http_server).
    uvicorn.run(
        app(args.heartbeat),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=5,
        access_log=False,
    )


if __name__ == "__main__":
    main()
