"""Health checks over HTTP, for orchestrators' probes and load balancers.

:func:`serve_health` answers, in a thread of its own:

``GET /livez``
    ``200`` while the process runs (a liveness probe: restart the process if it fails).
``GET /readyz``
    ``200`` while the server consumes its queue, else ``503`` (a readiness probe:
    connecting, reconnecting after a lost broker, or stopped).

Each answer is a small JSON object; ``kombu-rpc serve --health-port N`` starts it.
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
    """An HTTP server answering ``/livez`` and ``/readyz`` from a daemon thread.

    Use :func:`serve_health` to start one; :meth:`close` stops it (also as a context
    manager).
    """

    def __init__(self, ready: Callable[[], bool], host: str, port: int) -> None:
        answer = self._answer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = answer(self.path)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("health: " + format, *args)

        self._ready = ready
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

    def _answer(self, path: str) -> tuple[HTTPStatus, dict[str, str]]:
        route = path.split("?", 1)[0]
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
        return HTTPStatus.NOT_FOUND, {"error": f"no such path {route!r}: try /livez or /readyz"}

    def close(self) -> None:
        """Stop answering and close the socket; waits for the thread to end."""
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()

    def __enter__(self) -> HealthServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve_health(ready: Callable[[], bool], port: int, host: str = "127.0.0.1") -> HealthServer:
    """Start answering health probes on ``host:port`` (port ``0``: any free port).

    Args:
        ready: Called for each ``/readyz`` probe, from the health thread; for a
            server, ``lambda: server.ready``.
        port: The TCP port.
        host: The address to listen on; the default answers only this machine.
            In a container, ``0.0.0.0`` lets the orchestrator reach it.

    Raises:
        OSError: The address cannot be bound (the port is taken).
    """
    return HealthServer(ready, host, port)
