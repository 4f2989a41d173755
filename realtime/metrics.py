"""The service's Prometheus metrics, one registry per app (``prometheus_client``: exposition,
escaping and types are the library's).

Besides the series the service updates as it goes, every scrape reads the current state: places
in use and capacity (what an autoscaler scales on: ``realtime_contexts_active`` per pod), the queue,
whether the replica is draining, and the engine's own figures (the CosyVoice2 stages' counters and
their batch-size distributions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .engines.base import Distribution

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineCollector(Collector):
    """The engine's figures, read at scrape time: ``stats()`` (names ending in ``_total`` are
    counters, the rest gauges) and ``distributions()`` as histograms (see
    :meth:`realtime.engines.base.Engine.distributions`)."""

    def __init__(
        self,
        stats: Callable[[], Mapping[str, float]],
        distributions: Callable[[], Mapping[str, Distribution]],
    ) -> None:
        self._stats = stats
        self._distributions = distributions

    def collect(self) -> Iterator[Metric]:
        for name, value in self._stats().items():
            if name.endswith("_total"):
                yield CounterMetricFamily(name[: -len("_total")], name, value=value)
            else:
                yield GaugeMetricFamily(name, name, value=value)
        for name, d in self._distributions().items():
            bounds = [*(b for b in d.buckets if b != float("inf")), float("inf")]
            buckets = [
                ("+Inf" if b == float("inf") else f"{b:g}", sum(n for v, n in d.counts.items() if v <= b))
                for b in bounds
            ]
            total = d.total if d.total is not None else float(sum(v * n for v, n in d.counts.items()))
            yield HistogramMetricFamily(name, d.help, buckets=buckets, sum_value=total)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.sessions_total = Counter("realtime_sessions", "WebSocket sessions accepted", registry=r)
        self.sessions_active = Gauge("realtime_sessions_active", "WebSocket sessions open now", registry=r)
        self.contexts = Counter(
            "realtime_contexts", "Contexts (utterances) by outcome", ["outcome"], registry=r
        )
        self.errors = Counter("realtime_errors", "Error frames and responses by code", ["code"], registry=r)
        self.audio_seconds = Counter("realtime_audio_seconds", "Seconds of audio delivered", registry=r)
        self.frames_sent = Counter(
            "realtime_audio_frames_sent", "Audio frames sent on WebSockets", registry=r
        )
        self.bytes_sent = Counter("realtime_audio_bytes_sent", "Audio bytes sent on WebSockets", registry=r)
        self.http_requests = Counter(
            "realtime_http_synthesis", "HTTP synthesis requests by route", ["route"], registry=r
        )
        self.underruns = Counter(
            "realtime_underruns",
            "Audio that left later than a listener who started at the "
            "first audio needed it (a stall on the playback clock; network not counted)",
            registry=r,
        )
        self.ttfa = Histogram(
            "realtime_time_to_first_audio_seconds",
            "First text received to first audio sent",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.queue_wait = Histogram(
            "realtime_queue_wait_seconds",
            "Time an utterance waited for a place",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.delivery = Histogram(
            "realtime_delivery_ratio",
            "Per context: first to last audio sent over the "
            "audio's duration (below 1: delivered faster than it plays)",
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1, 1.25, 2, 5),
            registry=r,
        )
        self.rtf = Histogram(
            "realtime_context_rtf",
            "Per context: model compute time over audio time (its share of batched calls)",
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 2, 5),
            registry=r,
        )
        self.pacing_lateness = Histogram(
            "realtime_paced_send_lateness_seconds",
            "pacing realtime: how late each audio frame left against its schedule",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.contexts_active = Gauge(
            "realtime_contexts_active",
            "Utterances holding a place (speaking or waiting for more text): the autoscaling figure",
            registry=r,
        )
        self.capacity = Gauge(
            "realtime_capacity", "Places: utterances this replica speaks at once", registry=r
        )
        self.waiting = Gauge("realtime_waiting", "Utterances waiting for a place", registry=r)
        self.load = Gauge("realtime_load", "contexts_active / capacity", registry=r)
        self.draining = Gauge("realtime_draining", "1 while the replica drains for a shutdown", registry=r)

    def watch(
        self,
        active: Callable[[], int],
        capacity: Callable[[], int],
        waiting: Callable[[], int],
        draining: Callable[[], bool],
    ) -> None:
        """Gauges read from the service's state at every scrape."""
        self.contexts_active.set_function(active)
        self.capacity.set_function(capacity)
        self.waiting.set_function(waiting)
        self.load.set_function(lambda: active() / capacity() if capacity() else 1.0)
        self.draining.set_function(lambda: 1.0 if draining() else 0.0)

    def add_engine(
        self,
        stats: Callable[[], Mapping[str, float]],
        distributions: Callable[[], Mapping[str, Distribution]],
    ) -> None:
        self.registry.register(EngineCollector(stats, distributions))

    def render(self) -> bytes:
        return generate_latest(self.registry)
