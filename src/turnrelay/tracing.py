"""Tracing: OpenTelemetry spans along a turn's path, across processes.

    turn.submit (api) ─ turn.publish ──RabbitMQ headers──▶ turn.deliver (executor)
        ─ model.step … tool.call … model.step ─ turn.finish

The publisher injects the W3C trace context (``traceparent``) into the turn's
message headers; the executor continues the trace from them, so one trace spans
the API and the executor. Model steps and tool calls are read off the runtime's
events, so every runtime (``openai``, ``claude``, ``local``) gets them.

Off unless ``TURNRELAY_OTEL_ENDPOINT`` names an OTLP/HTTP collector (the
``otel`` extra installs the SDK and exporter). Off costs nothing per frame: no
OpenTelemetry module is imported, ``span`` is a no-op context manager, and the
runner makes no event spans at all.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

from turnrelay.errors import ConfigError
from turnrelay.runtime.base import StepFinish, ToolCall, ToolFailed, ToolResult, Usage

log = logging.getLogger(__name__)

_tracer: Any = None
_provider: Any = None


def setup(endpoint: str | None, service: str) -> None:
    """Export spans of this process as ``service`` to the OTLP/HTTP ``endpoint``."""
    global _tracer, _provider
    if not endpoint or _provider is not None:
        return
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ConfigError(
            "TURNRELAY_OTEL_ENDPOINT is set but OpenTelemetry is not installed: "
            "pip install 'turnrelay[otel]'"
        ) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    url = endpoint.rstrip("/")
    if not url.endswith("/v1/traces"):
        url += "/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    trace.set_tracer_provider(provider)
    _provider, _tracer = provider, provider.get_tracer("turnrelay")
    log.info("tracing: spans of %s go to %s", service, url)


def shutdown() -> None:
    """Flush what is buffered (at process exit)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _provider = _tracer = None


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def span(
    name: str,
    *,
    parent: Mapping[str, str] | None = None,
    kind: str = "INTERNAL",
    **attributes: Any,
) -> Iterator[Any]:
    """A span around the block, child of the current one, or of the trace context
    in ``parent`` (message headers) when given. A no-op when tracing is off."""
    if _tracer is None:
        yield None
        return
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    context = propagate.extract(dict(parent)) if parent else None
    with _tracer.start_as_current_span(
        name, context=context, kind=SpanKind[kind], attributes=_clean(attributes)
    ) as current:
        yield current


def inject() -> dict[str, str]:
    """The current trace context as message headers (empty when off)."""
    if _tracer is None:
        return {}
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def trace_id() -> str | None:
    """The current trace's id, 32 hex digits, for log lines."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {k.replace("_", "."): v for k, v in attributes.items() if v is not None}


class EventSpans:
    """``model.step`` and ``tool.call`` spans read off a runtime's events: a step
    runs from the turn's start (or the previous ``StepFinish``) to its first tool
    call or its own ``StepFinish``; a tool call from its ``ToolCall`` to its
    result. Made only when tracing is on."""

    def __init__(self) -> None:
        from opentelemetry import trace

        self._trace = trace
        self._since = time.time_ns()
        self._steps = 0
        self._step: Any = None
        self._step_done = False
        self._tools: dict[str, Any] = {}

    def feed(self, event: Any) -> None:
        if isinstance(event, ToolCall):
            self._finish_step()
            self._tools[event.call_id] = _tracer.start_span(
                "tool.call",
                attributes={"tool.name": event.tool_name, "tool.call.id": event.call_id},
            )
        elif isinstance(event, ToolResult | ToolFailed):
            tool = self._tools.pop(event.call_id, None)
            if tool is not None:
                if isinstance(event, ToolFailed):
                    tool.set_status(self._trace.Status(self._trace.StatusCode.ERROR, event.error))
                tool.end()
        elif isinstance(event, StepFinish):
            self._finish_step()
            self._since, self._step_done = time.time_ns(), False
        elif not isinstance(event, Usage) and self._step is None and not self._step_done:
            self._begin_step()

    def _begin_step(self) -> None:
        self._steps += 1
        self._step = _tracer.start_span(
            "model.step", start_time=self._since, attributes={"step": self._steps}
        )

    def _finish_step(self) -> None:
        if self._step_done:
            return
        if self._step is None:  # a step that only called tools
            self._begin_step()
        self._step.end()
        self._step, self._step_done = None, True

    def close(self) -> None:
        """End what is still open (a turn cancelled or failed mid-step)."""
        if self._step is not None:
            self._finish_step()
        for tool in self._tools.values():
            tool.end()
        self._tools.clear()
