"""Health checks (and metrics) over HTTP, for orchestrators' probes and Prometheus.

:func:`serve_health` answers, in a thread of its own:

``GET /livez``
    ``200`` while the process runs (a liveness probe: restart the process if it fails).
``GET /readyz``
    ``200`` while the server consumes its queue, else ``503`` (a readiness probe:
    connecting, reconnecting after a lost broker, or stopped).
``GET /metrics``
    With ``metrics=True``: the Prometheus instruments of :mod:`kombu_rpc.metrics`, in
    Prometheus' text format (``404`` otherwise).

The probes answer a small JSON object. ``kombu-rpc serve --health-port N`` (probes)
and ``--metrics-port N`` (metrics too) start it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["HealthServer", "serve_health"]

logger = logging.getLogger(__name__)


class HealthServer:
    """An HTTP server answering ``/livez``, ``/readyz`` (and ``/metrics``) from a
    daemon thread.

    Use :func:`serve_health` to start one; :meth:`close` stops it (also as a context
    manager).
    """

    def __init__(self, ready: Callable[[], bool], host: str, port: int, metrics: bool = False) -> None:
        answer = self._answer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = answer(self.path)
                if isinstance(body, tuple):
                    content_type, data = body
                else:
                    content_type, data = "application/json", json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("health: " + format, *args)

        self._ready = ready
        self._metrics = metrics
        self._http = ThreadingHTTPServer((host, port), Handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, name="kombu_rpc-health", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The port it listens on (the one chosen by the system for port ``0``)."""
        return int(self._http.server_address[1])

    @property
    def url(self) -> str:
        """``http://host:port``, where the two paths are."""
        host = str(self._http.server_address[0])
        return f"http://{host}:{self.port}"

    def _answer(self, path: str) -> tuple[HTTPStatus, dict[str, str] | tuple[str, bytes]]:
        route = path.split("?", 1)[0]
        if route == "/metrics" and self._metrics:
            return self._scrape()
        if route == "/livez":
            return HTTPStatus.OK, {"status": "alive"}
        if route == "/readyz":
            try:
                ready = self._ready()
            except Exception:  # a probe must answer, whatever the check raised
                logger.exception("health: the readiness check failed")
                ready = False
            if ready:
                return HTTPStatus.OK, {"status": "ready"}
            return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "not ready"}
        paths = "/livez, /readyz or /metrics" if self._metrics else "/livez or /readyz"
        return HTTPStatus.NOT_FOUND, {"error": f"no such path {route!r}: try {paths}"}

    def _scrape(self) -> tuple[HTTPStatus, dict[str, str] | tuple[str, bytes]]:
        from . import metrics

        registry = metrics.prometheus_registry()
        if registry is None:
            off = {"error": "metrics are off: call kombu_rpc.metrics.enable()"}
            return HTTPStatus.SERVICE_UNAVAILABLE, off
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return HTTPStatus.OK, (CONTENT_TYPE_LATEST, generate_latest(registry))

    def close(self) -> None:
        """Stop answering and close the socket; waits for the thread to end."""
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()

    def __enter__(self) -> HealthServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve_health(
    ready: Callable[[], bool], port: int, host: str = "127.0.0.1", *, metrics: bool = False
) -> HealthServer:
    """Start answering health probes on ``host:port`` (port ``0``: any free port).

    Args:
        ready: Called for each ``/readyz`` probe, from the health thread; for a
            server, ``lambda: server.ready``.
        port: The TCP port.
        host: The address to listen on; the default answers only this machine.
            In a container, ``0.0.0.0`` lets the orchestrator reach it.
        metrics: Also answer ``/metrics`` with the Prometheus instruments of
            :mod:`kombu_rpc.metrics` (once :func:`kombu_rpc.metrics.enable` was called).

    Raises:
        OSError: The address cannot be bound (the port is taken).
    """
    return HealthServer(ready, host, port, metrics)
