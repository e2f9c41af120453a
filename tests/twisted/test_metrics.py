"""The metrics: children bound once give the library's series; pool gauges follow the pool's figures."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from mailcow_smtp_api.web.metrics import Metrics


def _samples(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_bound_children_count_per_label_values() -> None:
    """Repeated labels() calls, named or positional, count into one series per label values."""
    metrics = Metrics()
    for _ in range(3):
        metrics.requests.labels(route="send", status="200", code="smtp_mail_sent").inc()
    metrics.requests.labels("send", "200", "smtp_mail_sent").inc()
    metrics.requests.labels(code="smtp_auth_failed", route="send", status="403").inc()
    assert metrics.requests.labels(route="send", status="200", code="smtp_mail_sent") is metrics.requests.labels(
        "send", "200", "smtp_mail_sent"
    )
    assert _samples(metrics, "smtpapi_http_requests_total") == {
        (("code", "smtp_mail_sent"), ("route", "send"), ("status", "200")): 4.0,
        (("code", "smtp_auth_failed"), ("route", "send"), ("status", "403")): 1.0,
    }


def test_pool_gauges_read_the_pool_at_each_scrape() -> None:
    """The gauges show the pool's idle and busy counts as they are when the metrics are rendered."""

    class Pool:
        idle = 0
        busy = 0

    metrics = Metrics()
    pool = Pool()
    metrics.watch_pool(pool)
    assert _samples(metrics, "smtpapi_smtp_pool_sessions") == {(("state", "busy"),): 0.0, (("state", "idle"),): 0.0}
    pool.idle, pool.busy = 2, 1
    assert _samples(metrics, "smtpapi_smtp_pool_sessions") == {(("state", "busy"),): 1.0, (("state", "idle"),): 2.0}
    assert b'smtpapi_smtp_pool_sessions{state="idle"} 2.0' in metrics.render()
    pool.idle, pool.busy = 0, 0
    assert _samples(metrics, "smtpapi_smtp_pool_sessions") == {(("state", "busy"),): 0.0, (("state", "idle"),): 0.0}
