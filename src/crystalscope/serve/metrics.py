"""serve's ``GET /metrics``: the Prometheus exposition of what the service does.

What a monitoring stack beside serve scrapes (all names start with ``crystalscope_``):

- ``requests_total{endpoint,method,status}``: every answered request, errors included;
- ``request_duration_seconds{endpoint}``: a latency histogram (buckets 5 ms to 10 s);
- ``images_total`` and ``predictions_total{class}``: images the model classified, by the class
  it predicted (``/predict`` and ``/similar``);
- ``unknown_images_total{reason}`` and ``unknown_share``: images the unknown-image detector
  flagged, by reason, and their share of all classified images since start (for a recent share,
  ``rate(crystalscope_unknown_images_total[5m]) / rate(crystalscope_images_total[5m])``);
- with ``--monitor``: ``monitor_status{crystalscope_monitor_status=…}`` (a state set: ok, alarm,
  unknown particles, degraded), ``monitor_windows``, ``monitor_alarm``, the last window's
  ``monitor_positive_fraction`` and the rule's ``monitor_false_positive_rate``, read from the
  monitor at scrape time.

Each app has its own registry (two apps in one process never share counts). Label values are
bounded: endpoints are the app's fixed paths (anything else is ``other``), classes the model's.
Cost: O(1) per request; a scrape O(classes + reasons + buckets).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, StateSetMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MONITOR_STATES = ("ok", "alarm", "unknown particles", "degraded")


class MonitorCollector(Collector):
    """The monitor's state, read when Prometheus scrapes (not when a request comes)."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Any]:
        status, _ = self.monitor.status()
        yield StateSetMetricFamily("crystalscope_monitor_status",
                                   "The monitor's status (as /health and OPC UA say it).",
                                   {state: state == status for state in MONITOR_STATES})
        result = self.monitor.result
        windows = result.windows
        yield GaugeMetricFamily("crystalscope_monitor_windows", "Windows judged so far.",
                                value=len(windows))
        yield GaugeMetricFamily("crystalscope_monitor_alarm", "1 once the alarm has fired.",
                                value=float(result.alarm is not None))
        if windows:
            yield GaugeMetricFamily("crystalscope_monitor_positive_fraction",
                                    "The last window's share of the positive class.",
                                    value=float(windows[-1].fraction))
        yield GaugeMetricFamily("crystalscope_monitor_false_positive_rate",
                                "The alarm rule's promised false-alarm rate per window.",
                                value=float(self.monitor.rule.false_positive_rate))


class UnknownShareCollector(Collector):
    """The flagged share since start, computed when Prometheus scrapes."""

    def __init__(self, metrics: ServeMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        seen, flagged = self.metrics.seen, self.metrics.flagged
        yield GaugeMetricFamily("crystalscope_unknown_share",
                                "Share of classified images flagged unknown since start.",
                                value=flagged / seen if seen else 0.0)


class ServeMetrics:
    """The counters of one app and their exposition."""

    def __init__(self, classes: list[str], endpoints: tuple[str, ...],
                 monitor: Any = None) -> None:
        self.endpoints = frozenset(endpoints)
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("crystalscope_requests", "HTTP requests answered.",
                                ["endpoint", "method", "status"], registry=registry)
        self.latency = Histogram("crystalscope_request_duration_seconds",
                                 "Time to answer a request.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.images = Counter("crystalscope_images", "Images the model classified.",
                              registry=registry)
        self.predictions = Counter("crystalscope_predictions",
                                   "Images classified, by predicted class.", ["class"],
                                   registry=registry)
        for name in classes:  # every class present from the start, at 0
            self.predictions.labels(name)
        self.unknown = Counter("crystalscope_unknown_images",
                               "Images the unknown-image detector flagged, by reason.",
                               ["reason"], registry=registry)
        self.seen = self.flagged = 0
        registry.register(UnknownShareCollector(self))
        if monitor is not None:
            registry.register(MonitorCollector(monitor))

    def endpoint(self, path: str) -> str:
        """The label for ``path``: one of the app's paths, else ``other`` (bounded labels)."""
        return path if path in self.endpoints else "other"

    def observe_request(self, path: str, method: str, status: int, seconds: float) -> None:
        endpoint = self.endpoint(path)
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_predictions(self, classes: list[str], reasons: list[str | None]) -> None:
        """One batch of predicted classes and their unknown reasons (None: not flagged)."""
        self.images.inc(len(classes))
        self.seen += len(classes)
        for name in classes:
            self.predictions.labels(name).inc()
        for reason in reasons:
            if reason is not None:
                self.unknown.labels(reason).inc()
                self.flagged += 1

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: time every HTTP request and count it by endpoint, method and status."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def noted(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noted)
        finally:
            self.metrics.observe_request(scope.get("path", ""), scope.get("method", ""), status,
                                         time.perf_counter() - started)
