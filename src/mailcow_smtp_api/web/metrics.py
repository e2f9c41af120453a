"""Prometheus metrics (text format) with the standard client library.

One ``Metrics`` object per process owns its own registry, so tests can make fresh ones. Labels
hold only bounded values: route, HTTP status, error code, SMTP reply class, failure kind.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web.resource import Resource


class PoolFigures(Protocol):
    """What the gauges read of the SMTP session pool."""

    @property
    def idle(self) -> int: ...  # noqa: D102

    @property
    def busy(self) -> int: ...  # noqa: D102


class BoundCounter(Counter):
    """A labelled counter whose children are bound once per label values and then reused.

    ``labels()`` of the library checks and converts its arguments and takes a lock on every call,
    which cost more per request than the increments themselves. Children are never removed here,
    so a child once returned stays the right one for those values.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bound: dict[Hashable, Any] = {}

    def labels(self, *values: Any, **named: Any) -> Any:
        """The child for these label values (the same object as the library's ``labels``)."""
        key = (values, tuple(named.items()))
        child = self._bound.get(key)
        if child is None:
            child = self._bound[key] = super().labels(*values, **named)
        return child


class Metrics:
    """The service's counters and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = BoundCounter(
            "smtpapi_http_requests",
            "HTTP requests answered, by route, status and result code",
            ["route", "status", "code"],
            registry=self.registry,
        )
        self.send_seconds = Histogram(
            "smtpapi_send_duration_seconds",
            "Time from request to answer of each message, on every send route",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.smtp_replies = BoundCounter(
            "smtpapi_smtp_outcomes",
            "SMTP submissions by outcome: 2xx, 4xx, 5xx reply classes or a failure kind (timeout, connect, tls, ...)",
            ["outcome"],
            registry=self.registry,
        )
        self.auth_failures = BoundCounter(
            "smtpapi_auth_failures",
            "Failed authentications by kind (api_key, mailbox)",
            ["kind"],
            registry=self.registry,
        )
        self.db_errors = Counter(
            "smtpapi_database_errors", "Requests answered smtp_db_unavailable", registry=self.registry
        )
        self.pool_sessions = Gauge(
            "smtpapi_smtp_pool_sessions", "Open pooled SMTP sessions", ["state"], registry=self.registry
        )

    def watch_pool(self, pool: PoolFigures) -> None:
        """The pool's idle and busy sessions, read from ``pool`` when the metrics are rendered.

        Nothing is written per take or release (several per message): the gauges ask the pool
        at each scrape.
        """
        self.pool_sessions.labels(state="idle").set_function(lambda: pool.idle)
        self.pool_sessions.labels(state="busy").set_function(lambda: pool.busy)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return bytes(generate_latest(self.registry))


class MetricsResource(Resource):
    """``GET /metrics`` (on whatever endpoint the operator chose)."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        """The current figures."""
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.render()
