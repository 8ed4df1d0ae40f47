"""kombu_rpc.health answers probes from the readiness check it was given."""

from __future__ import annotations

import http.client
import json
import threading

import pytest

from kombu_rpc.health import serve_health

pytestmark = pytest.mark.timeout(20)


def get(port: int, path: str) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read()), response.getheader("Content-Type", "")
    finally:
        conn.close()


def test_readiness_follows_the_check() -> None:
    ready = threading.Event()
    with serve_health(ready.is_set, 0) as health:
        assert health.url == f"http://127.0.0.1:{health.port}"
        assert get(health.port, "/readyz") == (503, {"status": "not ready"}, "application/json")
        ready.set()
        assert get(health.port, "/readyz?verbose=1") == (200, {"status": "ready"}, "application/json")
        assert get(health.port, "/livez")[:2] == (200, {"status": "alive"})


def test_a_check_that_raises_is_not_ready(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> bool:
        raise RuntimeError("no idea")

    with serve_health(broken, 0) as health:
        assert get(health.port, "/readyz")[:2] == (503, {"status": "not ready"})
    assert "the readiness check failed" in caplog.text


def test_close_frees_the_port() -> None:
    health = serve_health(lambda: True, 0)
    port = health.port
    health.close()
    with pytest.raises(ConnectionRefusedError):
        get(port, "/livez")
    serve_health(lambda: True, port).close()  # the port can be bound again


def test_metrics_are_answered_only_when_asked_for() -> None:
    from prometheus_client import CollectorRegistry

    from kombu_rpc import metrics

    with serve_health(lambda: True, 0) as health:
        status, body, _ = get(health.port, "/metrics")
        assert (status, body) == (404, {"error": "no such path '/metrics': try /livez or /readyz"})
    with serve_health(lambda: True, 0, metrics=True) as health:
        assert get(health.port, "/metrics")[:2] == (
            503,
            {"error": "metrics are off: call kombu_rpc.metrics.enable()"},
        )
        registry = CollectorRegistry()
        metrics.enable(registry)
        try:
            assert metrics.recorder is not None
            metrics.recorder.client_call_started("q")
            conn = http.client.HTTPConnection("127.0.0.1", health.port, timeout=5)
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            text = response.read().decode()
            conn.close()
        finally:
            metrics.disable()
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("text/plain; version=")
    assert 'kombu_rpc_client_calls_in_flight{queue="q"} 1.0' in text
