"""Prometheus metrics of the token server, in a registry of its own (one per app, no globals)."""

from __future__ import annotations

import enum
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401  (re-exported)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "glm4voice"
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
QUEUE_WAIT_BUCKETS_S = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Outcome(str, enum.Enum):
    """How a ``/generate_stream`` request ended (the ``outcome`` label)."""

    COMPLETED = "completed"  # the engine finished the stream (stop token or length)
    CANCELLED = "cancelled"  # the client went away
    REJECTED = "rejected"  # 4xx: bad request
    BUSY = "busy"  # 503: queue full or waited too long
    ENGINE_ERROR = "engine_error"  # the engine failed (500 before streaming, error line after)
    SHUTDOWN = "shutdown"  # stopped by the server shutting down (error line, or 503 while queued)


class ServerMetrics:
    def __init__(self, active_streams: Callable[[], float], queue_length: Callable[[], float]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "generate_stream requests by outcome", ["outcome"], registry=r)
        for outcome in Outcome:
            self.requests.labels(outcome.value)  # export zeros from the start
        self.active_streams = Gauge(
            f"{PREFIX}_active_streams", "streams holding a slot (generating or about to)", registry=r
        )
        self.active_streams.set_function(active_streams)
        self.queue_length = Gauge(f"{PREFIX}_queue_length", "requests waiting for a free stream slot", registry=r)
        self.queue_length.set_function(queue_length)
        self.tokens_generated = Counter(f"{PREFIX}_tokens_generated", "token ids streamed to clients", registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "request arrival to the first token line sent",
            buckets=TTFT_BUCKETS_S, registry=r)  # fmt: skip
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds", "time a request waited for a stream slot",
            buckets=QUEUE_WAIT_BUCKETS_S, registry=r)  # fmt: skip

    def register_engine(self, stats: Callable[[], dict[str, float]], counters: frozenset[str] = frozenset()) -> None:
        """Export the engine's own figures (read at scrape time) as ``glm4voice_engine_*``:
        the names in ``counters`` as counters, the others as gauges."""
        self.registry.register(_EngineCollector(stats, counters))

    def count(self, outcome: Outcome) -> None:
        self.requests.labels(outcome.value).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, float]], counters: frozenset[str]):
        self._stats = stats
        self._counters = counters

    def collect(self):
        for name, value in sorted(self._stats().items()):
            if not isinstance(value, (int, float)):
                continue
            family = CounterMetricFamily if name in self._counters else GaugeMetricFamily
            yield family(f"{PREFIX}_engine_{name}", f"engine {name.replace('_', ' ')}", value=float(value))

    def describe(self):
        return []
