"""Prometheus metrics, one registry per process (built by the composition root).

Everything timed or counted is recorded here, through a few named methods, so
no module wraps its own calls in timing code.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self, role: str, workers: int = 0) -> None:
        self.registry = CollectorRegistry()
        self.role = role
        self.active_turns = Gauge(
            "turnrelay_active_turns",
            "Turns running on this executor now",
            registry=self.registry,
        )
        self.worker_pool = Gauge(
            "turnrelay_worker_pool_size",
            "Turns this executor may run at once",
            registry=self.registry,
        )
        self.worker_pool.set(workers)
        self.utilisation = Gauge(
            "turnrelay_worker_utilisation",
            "active_turns / worker_pool_size",
            registry=self.registry,
        )
        self.utilisation.set_function(
            lambda: self.active_turns._value.get() / workers if workers else 0.0
        )
        self.turns_finished = Counter(
            "turnrelay_turns_finished",
            "Turns ended, by terminal status",
            ["status"],
            registry=self.registry,
        )
        self.turn_duration = Histogram(
            "turnrelay_turn_duration_seconds",
            "Wall time of one attempt of a turn",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1500),
            registry=self.registry,
        )
        self.frames = Counter(
            "turnrelay_frames_written",
            "Frames appended to the event log",
            registry=self.registry,
        )
        self.http_requests = Counter(
            "turnrelay_http_requests",
            "API requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.open_streams = Gauge(
            "turnrelay_open_streams",
            "SSE streams this API process is serving",
            registry=self.registry,
        )
        self.deliveries = Counter(
            "turnrelay_deliveries",
            "Turn messages this executor settled, by what became of them: done (an "
            "attempt ran, or the turn was ended here), ended (the turn had ended: "
            "dropped), requeued (its session is held elsewhere, or a backend failed), "
            "superseded (a newer attempt owns the turn), deleted (its session is "
            "gone), abandoned (left to the broker at shutdown)",
            ["outcome"],
            registry=self.registry,
        )
        self.takeovers = Counter(
            "turnrelay_turns_republished",
            "Turns published again because their executor stopped beating (reaper) "
            "or their head's publish was never confirmed (sweeper)",
            ["by"],
            registry=self.registry,
        )
        self.turns_submitted = Counter(
            "turnrelay_turns_submitted",
            "Turns accepted by the API",
            registry=self.registry,
        )

        self.rpc_calls = Counter(
            "turnrelay_rpc_calls",
            "db-manager calls answered, by method and HTTP status",
            ["method", "status"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "turnrelay_rpc_seconds",
            "Time the db-manager took to answer one call, by method",
            ["method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=self.registry,
        )

    def rpc_call(self, method: str, status: int, seconds: float) -> None:
        self.rpc_calls.labels(method, str(status)).inc()
        self.rpc_seconds.labels(method).observe(seconds)

    def turn_finished(self, status: str, seconds: float | None) -> None:
        self.turns_finished.labels(status).inc()
        if seconds is not None:
            self.turn_duration.observe(seconds)

    def delivery(self, outcome: str) -> None:
        self.deliveries.labels(outcome).inc()

    def frames_written(self, count: int) -> None:
        self.frames.inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
