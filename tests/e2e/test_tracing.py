"""One trace across processes: `turnrelay api` and `turnrelay executor` export
OpenTelemetry spans over OTLP/HTTP to a collector this test runs; the trace
context rides in the RabbitMQ message headers. Logs are JSON lines naming the
turn and the trace."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.e2e.cluster import Cluster, running_cluster
from tests.procs import free_port, read_sse

pytestmark = pytest.mark.slow
AUTH = {"authorization": "Bearer tok-alice"}


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start: int
    end: int
    attributes: dict[str, Any]
    status: int


@dataclass
class Collector:
    """An OTLP/HTTP trace receiver: what the real exporters post, decoded."""

    url: str
    spans: list[Span] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            service = next(
                a.value.string_value
                for a in resource.resource.attributes
                if a.key == "service.name"
            )
            for scope in resource.scope_spans:
                for s in scope.spans:
                    attributes = {
                        a.key: getattr(a.value, a.value.WhichOneof("value")) for a in s.attributes
                    }
                    with self.lock:
                        self.spans.append(
                            Span(
                                service,
                                s.name,
                                s.trace_id.hex(),
                                s.span_id.hex(),
                                s.parent_span_id.hex(),
                                s.start_time_unix_nano,
                                s.end_time_unix_nano,
                                attributes,
                                s.status.code,
                            )
                        )

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, name: str, turn_id: str, timeout: float = 20) -> Span:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for s in self.spans:
                    if s.name == name and s.attributes.get("turn.id") == turn_id:
                        return s
            time.sleep(0.05)
        raise AssertionError(f"no {name} span of turn {turn_id} arrived")


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    port = free_port()
    sink = Collector(f"http://127.0.0.1:{port}")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            assert self.path == "/v1/traces"
            assert self.headers["content-type"] == "application/x-protobuf"
            sink.add(body)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield sink
    server.shutdown()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, collector: Collector) -> Iterator[Cluster]:
    env = {
        "TURNRELAY_OTEL_ENDPOINT": collector.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s (default 5 s)
        "TURNRELAY_LOG_FORMAT": "json",
    }
    with running_cluster(
        tmp_path_factory.mktemp("tracing"), apis=1, executors=1, extra_env=env
    ) as c:
        yield c


def test_one_trace_spans_api_and_executor_for_a_tool_turn(
    cluster: Cluster, collector: Collector
) -> None:
    with httpx.Client(base_url=cluster.apis[0].url, headers=AUTH, timeout=30) as client:
        sid = client.post("/api/chat/sessions").json()["id"]
        marker = uuid.uuid4().hex[:8]
        message = f'{marker} fake:tool=calculate:{{"expression": "2 + 3"}}'
        with client.stream(
            "POST", f"/api/chat/sessions/{sid}/stream", json={"message": message}
        ) as r:
            sse = read_sse(r)
        assert sse.done
        turn_id = client.get(f"/api/chat/sessions/{sid}").json()["messages"][0]["turn_id"]

    submit = collector.wait_for("turn.submit", turn_id)
    finish = collector.wait_for("turn.finish", turn_id)
    assert finish.trace_id == submit.trace_id
    time.sleep(0.3)  # the last batch of the executor's spans
    spans = collector.trace(submit.trace_id)
    by_name: dict[str, list[Span]] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    (publish,) = by_name["turn.publish"]
    (deliver,) = by_name["turn.deliver"]
    steps = sorted(by_name["model.step"], key=lambda s: s.start)
    (tool,) = by_name["tool.call"]
    # Two processes, one trace.
    assert (submit.service, publish.service) == ("turnrelay-api", "turnrelay-api")
    assert {deliver.service, tool.service, finish.service} == {"turnrelay-executor"}
    assert all(s.service == "turnrelay-executor" for s in steps)
    # The chain: submit → publish →(RabbitMQ headers)→ deliver → steps, tool, finish.
    assert submit.parent_id == ""
    assert publish.parent_id == submit.span_id
    assert deliver.parent_id == publish.span_id
    assert {s.parent_id for s in [*steps, tool, finish]} == {deliver.span_id}
    assert deliver.attributes["session.id"] == sid
    # The tool loop in order: model step, the tool, the model step that answers.
    assert len(steps) == 2
    assert tool.attributes["tool.name"] == "calculate"
    assert steps[0].end <= tool.start <= tool.end <= steps[1].start <= finish.start
    assert finish.attributes["status"] == "completed"

    # JSON log lines name the turn, its attempt and the trace.
    lines = [json.loads(x) for x in cluster.executors[0].log().splitlines() if x.startswith("{")]
    about = [x for x in lines if x.get("turn_id") == turn_id]
    assert about, "no log line about the turn"
    done = next(x for x in about if "completed" in x["message"])
    assert done["session_id"] == sid and done["attempt"] == 1
    assert done["trace_id"] == submit.trace_id
    assert all({"ts", "level", "logger", "message"} <= x.keys() for x in lines)
