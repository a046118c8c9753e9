"""A local LLM server with scripted, deterministic replies: OpenAI and Anthropic wire formats.

Tests, demos and benchmarks point a client at it: an OpenAI client with
``base_url=http://HOST:PORT/v1``, an Anthropic client or the Claude Code CLI with
``ANTHROPIC_BASE_URL=http://HOST:PORT``. It answers

    POST /v1/chat/completions        OpenAI chat completions (SSE stream or JSON)
    POST /v1/messages                Anthropic Messages (SSE stream of ``content_block_*``
                                     events, or JSON)
    POST /v1/messages/count_tokens   Anthropic token counting (an estimate)
    GET  /v1/models                  both formats' model lists

and records anything else it is sent, answering 404. The reply is
``Echo: <last user text>`` unless directives in the last user text say otherwise;
directives are stripped from the echoed text and may be combined:

    fake:tokens=N        reply ``t0 t1 … t(N-1)``, one chunk per token
    fake:reasoning=N     first stream ``r0 r1 …`` as reasoning (``reasoning_content``,
                         or a ``thinking`` block)
    fake:delay_ms=D      pause D ms between chunks
    fake:fail_after=N    stream N chunks, then break the connection (no end of stream)
    fake:error=STATUS    answer HTTP STATUS with an error body of the API's shape
    fake:tool=NAME:{…}   call tool NAME with those JSON arguments (``:{…}`` may be left
                         out); once the request carries the tool's result, reply
                         ``Tool NAME returned: <result>``. NAME also matches a tool the
                         request offers as ``<prefix>__NAME`` (an MCP tool's name). A
                         request whose ``tool_choice`` is none gets the echo instead.
    fake:steps=N         with ``fake:tool``: call the tool N times (N model steps that
                         run it), then reply as above
    fake:aside           in a user message: it is not the prompt; the reply follows the
                         user message before it (a message that steered a running turn)

The "last user text" is the last user message that is not a tool result (nor an
aside), so the directive still applies to the request that carries the tool's result.

With a record file, every request is appended as one JSON line
``{"event": "request", "request_index", "path", "t", "body"}`` and every streamed
response, when it ends, as ``{"event": "closed", "request_index", "t", "completed"}``:
``completed`` is false when the client went away or ``fail_after`` broke the stream,
so a test can prove that a model stream was closed. ``t`` is ``time.monotonic()``
(system-wide on Linux, comparable across processes). Each line is one unbuffered
append, so readers never see half a line.
"""

from turnrelay.devtools.fake_llm.app import build_app
from turnrelay.devtools.fake_llm.script import MODEL_ID, Script, parse_directives
from turnrelay.devtools.fake_llm.server import DEFAULT_PORT, FakeLLM, main, serve

__all__ = [
    "DEFAULT_PORT",
    "MODEL_ID",
    "FakeLLM",
    "Script",
    "build_app",
    "main",
    "parse_directives",
    "serve",
]
