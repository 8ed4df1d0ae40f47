"""Ctrl-C and SIGTERM on ``kombu-rpc serve`` and ``kombu-rpc call``, as subprocesses on
RabbitMQ.

A served ``held`` call (``HOLD=1``) prints ``held VALUE`` on the server's stderr, then
waits for a line on its stdin: tests know when it runs and decide when it returns.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kombu_rpc import RPCProxy

from . import test_cli
from .test_cli import Running, clean_env

# The fixtures of test_cli: a project folder with services.py, and servers started in it
project = test_cli.project
start = test_cli.start

pytestmark = pytest.mark.timeout(90)


def test_ctrl_c_during_call_exits_130_without_a_traceback(
    start: Callable[..., Running],
    amqp_url: str,
    project: Path,
    queue_name: str,
) -> None:
    # Given a call held in the remote function
    server = start(hold=True)
    with subprocess.Popen(
        [sys.executable, "-m", "kombu_rpc", "call", "held", "1", "-b", amqp_url, "-q", queue_name],
        cwd=project,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as caller:
        server.wait_for("held 1")
        # When the caller gets Ctrl-C
        caller.send_signal(signal.SIGINT)
        out, err = caller.communicate(timeout=30)
    server.release()
    # Then it exits with 130 and one line, no traceback
    assert (caller.returncode, out) == (130, "")
    assert err == "Interrupted; the request was sent and may still run\n"


def test_first_ctrl_c_on_serve_lets_the_call_in_flight_finish(
    start: Callable[..., Running], amqp_url: str, queue_name: str
) -> None:
    server = start(hold=True)
    with RPCProxy(amqp_url, queue=queue_name, timeout=30) as proxy:
        # Given a call in flight
        future = proxy.held.call_async("x")
        server.wait_for("held x")
        # When the server gets Ctrl-C once
        server.process.send_signal(signal.SIGINT)
        line = server.wait_for("SIGINT")
        assert "stopping gracefully" in line and "Ctrl-C again to stop at once" in line
        # Then the call still completes, and the server exits with 0
        server.release()
        assert future.result(30) == "x"
    assert server.process.wait(30) == 0
    assert "Traceback" not in server.stderr_text()


def test_second_ctrl_c_on_serve_stops_at_once_and_the_request_is_redelivered(
    start: Callable[..., Running], amqp_url: str, queue_name: str
) -> None:
    first = start(hold=True)
    with RPCProxy(amqp_url, queue=queue_name, timeout=60) as proxy:
        # Given a call held in a remote function
        future = proxy.held.call_async("again")
        first.wait_for("held again")
        # When the server gets Ctrl-C twice (the second once the first was handled)
        first.process.send_signal(signal.SIGINT)
        first.wait_for("stopping gracefully")
        first.process.send_signal(signal.SIGINT)
        # Then it stops at once, saying the request is left unacknowledged
        assert first.process.wait(15) == 130
        line = first.wait_for("SIGINT again")
        assert "stopping at once" in line and "unacknowledged" in line
        assert "Traceback" not in first.stderr_text()
        # And the broker delivers the request to another server, which answers the call
        start()
        assert future.result(60) == "again"


def test_second_sigterm_also_stops_at_once(
    start: Callable[..., Running], amqp_url: str, queue_name: str
) -> None:
    server = start(hold=True)
    with RPCProxy(amqp_url, queue=queue_name, timeout=30) as proxy:
        proxy.held.cast("t")
        server.wait_for("held t")
        server.process.send_signal(signal.SIGTERM)
        server.wait_for("SIGTERM: stopping gracefully")
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(15) == 128 + signal.SIGTERM
        assert "SIGTERM again: stopping at once" in server.stderr_text()
