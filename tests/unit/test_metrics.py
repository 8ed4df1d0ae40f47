"""kombu_rpc.metrics: what each report counts, in Prometheus and OpenTelemetry."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kombu_rpc import ConfigurationError, ConnectionLostError, NoServerError, RemoteError, RPCTimeout, metrics

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    reg = CollectorRegistry()
    metrics.enable(reg)
    yield reg
    metrics.disable()


def test_server_reports_count_into_prometheus(registry: CollectorRegistry) -> None:
    recorder = metrics.recorder
    assert recorder is not None
    recorder.server_call_started("q")
    assert registry.get_sample_value("kombu_rpc_server_calls_in_flight", {"queue": "q"}) == 1
    recorder.server_call_ended("q", "fib", "ok", 0.003, 0.02)
    recorder.server_call_started("q")
    recorder.server_call_ended("q", "fib", "error", 0.5, None)
    recorder.server_event("q", "redeliveries")
    recorder.server_call_refused("q", "nope")
    value = registry.get_sample_value
    assert value("kombu_rpc_server_calls_in_flight", {"queue": "q"}) == 0
    assert value("kombu_rpc_server_calls_total", {"queue": "q", "method": "fib", "outcome": "ok"}) == 1
    assert value("kombu_rpc_server_calls_total", {"queue": "q", "method": "fib", "outcome": "error"}) == 1
    assert value("kombu_rpc_server_call_duration_seconds_count", {"queue": "q", "method": "fib"}) == 2
    assert value("kombu_rpc_server_call_duration_seconds_sum", {"queue": "q", "method": "fib"}) == 0.503
    assert value("kombu_rpc_server_queue_wait_seconds_count", {"queue": "q"}) == 1
    assert value("kombu_rpc_server_queue_wait_seconds_bucket", {"queue": "q", "le": "0.025"}) == 1
    assert value("kombu_rpc_server_calls_total", {"queue": "q", "method": "nope", "outcome": "refused"}) == 1
    assert value("kombu_rpc_server_redeliveries_total", {"queue": "q"}) == 1
    assert value("kombu_rpc_server_reconnects_total", {"queue": "q"}) is None  # none yet


def test_client_reports_count_into_prometheus(registry: CollectorRegistry) -> None:
    recorder = metrics.recorder
    assert recorder is not None
    recorder.client_call_started("q")
    recorder.client_call_ended("q", "fib", "timeout", 10.0)
    recorder.client_event("dropped_replies", "late")
    recorder.client_event("reconnects")
    value = registry.get_sample_value
    assert value("kombu_rpc_client_calls_in_flight", {"queue": "q"}) == 0
    assert value("kombu_rpc_client_calls_total", {"queue": "q", "method": "fib", "outcome": "timeout"}) == 1
    assert (
        value("kombu_rpc_client_call_duration_seconds_bucket", {"queue": "q", "method": "fib", "le": "10.0"})
        == 1
    )
    assert value("kombu_rpc_client_dropped_replies_total", {"reason": "late"}) == 1
    assert value("kombu_rpc_client_reconnects_total") == 1


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (None, "ok"),
        (RemoteError("ValueError", "bad"), "remote_error"),
        (RPCTimeout("fib", 1.0), "timeout"),
        (NoServerError("no queue"), "no_server"),
        (ConnectionLostError("gone"), "connection_lost"),
        (RuntimeError("?"), "error"),
    ],
)
def test_client_outcomes(exc: BaseException | None, outcome: str) -> None:
    assert metrics.client_outcome(exc) == outcome


def test_enable_twice_or_for_nothing_is_an_error(registry: CollectorRegistry) -> None:
    with pytest.raises(ConfigurationError, match="already enabled"):
        metrics.enable(CollectorRegistry())
    metrics.disable()
    with pytest.raises(ConfigurationError, match="needs prometheus=True or opentelemetry=True"):
        metrics.enable(prometheus=False)
    metrics.enable(registry)  # disable() unregistered the instruments: they register again


def test_disable_stops_counting_and_unregisters() -> None:
    reg = CollectorRegistry()
    metrics.enable(reg)
    metrics.disable()
    assert metrics.recorder is None
    assert list(reg.collect()) == []


def test_the_same_numbers_in_opentelemetry() -> None:
    sdk = pytest.importorskip("opentelemetry.sdk.metrics")
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = sdk.MeterProvider(metric_readers=[reader])
    reg = CollectorRegistry()
    metrics.enable(reg, opentelemetry=True, meter_provider=provider)
    try:
        recorder = metrics.recorder
        assert recorder is not None
        recorder.server_call_started("q")
        recorder.server_call_ended("q", "fib", "ok", 0.25, None)
        recorder.client_call_started("q")
        recorder.client_call_ended("q", "fib", "no_server", 0.01)
        recorder.client_event("dropped_replies", "unknown")
        recorder.event_handled("logs", "app.h", "error")
        recorder.event_published("logs")
        # ... counted into Prometheus at the same time
        labels = {"queue": "q", "method": "fib", "outcome": "ok"}
        assert reg.get_sample_value("kombu_rpc_server_calls_total", labels) == 1
    finally:
        metrics.disable()
    points: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points[metric.name] = list(metric.data.data_points)
    calls = points["kombu_rpc.client.calls"]
    assert [(p.value, dict(p.attributes)) for p in calls] == [
        (1, {"queue": "q", "method": "fib", "outcome": "no_server"})
    ]
    (duration,) = points["kombu_rpc.server.call.duration"]
    assert (duration.count, duration.sum) == (1, 0.25)
    assert [p.value for p in points["kombu_rpc.server.calls_in_flight"]] == [0]
    assert [dict(p.attributes) for p in points["kombu_rpc.client.dropped_replies"]] == [{"reason": "unknown"}]
    assert [(p.value, dict(p.attributes)) for p in points["kombu_rpc.events.handled"]] == [
        (1, {"exchange": "logs", "subscription": "app.h", "outcome": "error"})
    ]
    assert [(p.value, dict(p.attributes)) for p in points["kombu_rpc.events.published"]] == [
        (1, {"exchange": "logs"})
    ]
    # ... and into Prometheus at the same time
    assert (
        reg.get_sample_value("kombu_rpc_server_calls_total", {"queue": "q", "method": "fib", "outcome": "ok"})
        is None
    )


def test_an_enable_that_fails_leaves_nothing_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if not installed
    reg = CollectorRegistry()
    with pytest.raises(ConfigurationError, match="OpenTelemetry metrics need opentelemetry-api"):
        metrics.enable(reg, opentelemetry=True)
    assert metrics.recorder is None and list(reg.collect()) == []
    metrics.enable(reg)  # and it can be enabled afterwards
    metrics.disable()
