"""Prometheus text exposition of the service's counters, without a client library: the handful of
series we keep do not justify a dependency, and the format is simple and stable."""

from __future__ import annotations

import bisect
import itertools
import threading
from collections import defaultdict


class Counter:
    def __init__(self, name: str, help: str, label: str | None = None) -> None:
        self.name, self.help, self.label = name, help, label
        self._values: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, label_value: str = "", value: float = 1.0) -> None:
        with self._lock:
            self._values[label_value] += value

    def get(self, label_value: str = "") -> float:
        return self._values.get(label_value, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        values = dict(self._values)
        if not values and self.label is None:
            values = {"": 0.0}  # an unlabelled series is always exposed
        for lv, v in sorted(values.items()):
            labels = f'{{{self.label}="{lv}"}}' if self.label else ""
            lines.append(f"{self.name}{labels} {v:g}")
        return lines


class Gauge(Counter):
    def dec(self, label_value: str = "", value: float = 1.0) -> None:
        self.inc(label_value, -value)

    def render(self) -> list[str]:
        lines = super().render()
        lines[1] = f"# TYPE {self.name} gauge"
        return lines


class Histogram:
    """Counts per bucket (made cumulative when rendered), so an observation is one bisect: the
    paced-send histogram takes one per audio frame."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._n = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self._sum += value
            self._n += 1
            self._counts[i] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for b, c in zip(self.buckets, itertools.accumulate(self._counts), strict=False):
            lines.append(f'{self.name}_bucket{{le="{b:g}"}} {c}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self._n}', f"{self.name}_sum {self._sum:g}", f"{self.name}_count {self._n}"]
        return lines


class Metrics:
    def __init__(self) -> None:
        self.sessions_total = Counter("realtime_sessions_total", "WebSocket sessions accepted")
        self.sessions_active = Gauge("realtime_sessions_active", "WebSocket sessions open now")
        self.contexts = Counter("realtime_contexts_total", "Contexts (utterances) by outcome", "outcome")
        self.errors = Counter("realtime_errors_total", "Error frames and responses by code", "code")
        self.audio_seconds = Counter("realtime_audio_seconds_total", "Seconds of audio delivered")
        self.http_requests = Counter("realtime_http_synthesis_total", "HTTP synthesis requests by route", "route")
        self.ttfa = Histogram("realtime_time_to_first_audio_seconds", "First text received to first audio sent",
                              (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30))
        self.pacing_lateness = Histogram("realtime_paced_send_lateness_seconds",
                                         "pacing realtime: how late each audio frame left against its schedule",
                                         (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    def render(self, extra: dict[str, float] | None = None) -> str:
        lines: list[str] = []
        for m in (self.sessions_total, self.sessions_active, self.contexts, self.errors, self.audio_seconds,
                  self.http_requests, self.ttfa, self.pacing_lateness):
            lines += m.render()
        for name, value in (extra or {}).items():
            lines += [f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"


METRICS = Metrics()
