"""``kombu-rpc serve --health-port``: liveness and readiness probes over HTTP, with the
server as a subprocess on each real broker."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kombu import Connection

from kombu_rpc.topology import request_queue

from ..integration.tcpproxy import TCPProxy
from . import test_cli
from .test_cli import Running, clean_env

project = test_cli.project
start_on_each = test_cli.start_on_each

pytestmark = pytest.mark.timeout(90)


def get(url: str, path: str) -> tuple[int, dict[str, str]]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def health_url(server: Running) -> str:
    line = server.wait_for("health: ", stream="out")
    found = re.search(r"health: (http://127\.0\.0\.1:\d+)/livez \1/readyz", line)
    assert found, line
    return found.group(1)


def test_a_consuming_server_is_alive_and_ready(start_on_each: Callable[..., Running]) -> None:
    # Given a server answering health probes on a port the system picked
    server = start_on_each("--health-port", "0")  # returns once it consumes
    url = health_url(server)
    # Then it is alive and ready, and says which paths exist
    assert get(url, "/livez") == (200, {"status": "alive"})
    assert get(url, "/readyz") == (200, {"status": "ready"})
    status, body = get(url, "/health")
    assert status == 404 and "try /livez or /readyz" in body["error"]
    # When it stops, the probes stop answering with it
    server.stop()
    assert server.process.returncode == 0
    with pytest.raises(ConnectionRefusedError):
        get(url, "/livez")


def test_a_server_that_lost_its_broker_is_alive_but_not_ready_until_back(
    amqp_url: str, project: Path, queue_name: str
) -> None:
    # (RabbitMQ only: a Redis server on a stalled connection notices the loss only after
    # its socket timeout and redis-py's own retries, which can outlast the test's wait.)
    real_broker_url = amqp_url
    with TCPProxy.for_url(real_broker_url) as tcp:
        # Given a server that consumes through a TCP proxy, and answers health probes
        args = ["serve", "services", "--broker", tcp.url(real_broker_url), "--queue", queue_name]
        server = Running([*args, "--health-port", "0"], project, clean_env())
        try:
            url = health_url(server)
            server.wait_for(f"consuming {queue_name!r}")
            assert get(url, "/readyz") == (200, {"status": "ready"})
            # When its connections are cut and new ones hang
            tcp.stall()
            tcp.sever()
            # Then it is alive but not ready, while it tries to reconnect
            server.wait_for("lost its connection")
            assert wait_for_status(url, 503) == {"status": "not ready"}
            assert get(url, "/livez") == (200, {"status": "alive"})
            # ... and ready again once the broker is reachable
            tcp.resume()
            assert wait_for_status(url, 200, timeout=30) == {"status": "ready"}
        finally:
            server.stop()
    with Connection(real_broker_url) as conn:  # the server never deletes its queue
        queue = request_queue(queue_name)(conn.default_channel)
        queue.purge()
        queue.delete()


def wait_for_status(url: str, status: int, timeout: float = 10) -> dict[str, str]:
    """Probe ``/readyz`` until it answers ``status``; return that answer's body."""
    deadline = time.monotonic() + timeout
    seen: list[int] = []
    while time.monotonic() < deadline:
        got, body = get(url, "/readyz")
        if got == status:
            return body
        seen.append(got)
        time.sleep(0.05)  # a probe's period; the deadline bounds the wait
    pytest.fail(f"/readyz did not answer {status} within {timeout}s (answers: {sorted(set(seen))})")


def test_a_taken_health_port_is_one_error_line(project: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--broker", "amqp://guest:guest@127.0.0.1:5672//", "--health-port", str(port)]
        done = test_cli.cli("serve", "services", *args, cwd=project)
    assert done.returncode == 1, done
    assert done.stderr.startswith(f"Error: cannot answer health probes on 127.0.0.1:{port}: "), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("port", ["-1", "65536", "http"])
def test_a_health_port_out_of_range_is_a_usage_error(project: Path, port: str) -> None:
    done = test_cli.cli("serve", "services", "--health-port", port, cwd=project)
    assert done.returncode == 2
    assert "expected a TCP port (0 to 65535)" in done.stderr
