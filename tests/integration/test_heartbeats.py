"""AMQP heartbeats during a call longer than the broker lets a silent connection live.

RabbitMQ closes a connection that sent nothing for two heartbeat intervals. A server
with ``concurrency=1`` runs the call in its consuming thread; its heartbeater sends the
heartbeats meanwhile, so the call completes once, on the connection it came on. On a
private node of the run's own (``private_rabbit``), with ``?heartbeat=2``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest

from kombu_rpc import Event, EventPublisher, Registry, RPCProxy, RPCServer
from kombu_rpc import _consumer as consumer_module
from kombu_rpc.testing import make_registry, unique_queue_name

from ..brokers import PrivateRabbit
from ..conftest import delete_queue

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90)]

#: The heartbeat interval the connections ask for (the node's default is 60 s).
HEARTBEAT = 2
#: How long the call runs: over three intervals, well past the broker's limit of two.
CALL_SECONDS = 3 * HEARTBEAT + 1.5


class Runs:
    """Counts the runs of the long call."""

    def __init__(self) -> None:
        self.count = 0
        self.cond = threading.Condition()

    def long_call(self, seconds: float) -> str:
        with self.cond:
            self.count += 1
            self.cond.notify_all()
        time.sleep(seconds)  # the call's own work: a long computation
        return "done"

    def wait(self, count: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.count >= count, timeout)


@pytest.fixture
def url(private_rabbit: PrivateRabbit) -> str:
    return f"{private_rabbit.url}?heartbeat={HEARTBEAT}"


@pytest.fixture
def queue(private_rabbit: PrivateRabbit) -> Iterator[str]:
    name = unique_queue_name("test.heartbeats")
    yield name
    delete_queue(private_rabbit.url, name)


class Silent:
    """A heartbeater that sends nothing."""

    def bind(self, connection: object) -> None:
        pass

    def away(self) -> None:
        pass

    def back(self) -> None:
        pass

    def close(self) -> None:
        pass


def lost(caplog: pytest.LogCaptureFixture, who: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == f"kombu_rpc.{who}" and "lost" in r.getMessage()
    ]


def serve_and_call(url: str, queue: str, proxy_url: str) -> tuple[Runs, str]:
    runs = Runs()
    server = RPCServer(url, registry=make_registry({"long_call": runs.long_call}), queue=queue)
    with server.running(), RPCProxy(proxy_url, queue=queue, timeout=4 * CALL_SECONDS) as proxy:
        result = proxy.long_call(CALL_SECONDS)
        assert proxy.long_call(0) == "done"  # the server goes on, on the same connection
    return runs, result


def test_a_long_inline_call_keeps_the_servers_connection(
    url: str, queue: str, private_rabbit: PrivateRabbit, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kombu_rpc")
    # the proxy sends no heartbeats: only the server's connection is put to the test
    runs, result = serve_and_call(url, queue, f"{private_rabbit.url}?heartbeat=0")
    assert result == "done"
    assert runs.count == 2  # the long call once (never redelivered), then the short one
    assert lost(caplog, "server") == []


def test_without_the_heartbeater_the_broker_closes_the_connection_and_redelivers(
    url: str, queue: str, private_rabbit: PrivateRabbit, caplog: pytest.LogCaptureFixture
) -> None:
    """The control: without heartbeats during the call, the broker closes the server's
    connection mid-call and delivers the request again, to run again (and again)."""
    caplog.set_level(logging.INFO, logger="kombu_rpc")
    runs = Runs()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(consumer_module, "Heartbeater", Silent)
        server = RPCServer(url, registry=make_registry({"long_call": runs.long_call}), queue=queue)
        proxy_url = f"{private_rabbit.url}?heartbeat=0"
        with server.running(), RPCProxy(proxy_url, queue=queue, timeout=4 * CALL_SECONDS) as proxy:
            proxy.long_call.call_async(CALL_SECONDS)
            assert runs.wait(2, 3 * CALL_SECONDS), "the request was not delivered again"
    assert lost(caplog, "server")


def test_a_proxy_waiting_on_a_long_call_keeps_its_connection(
    url: str, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kombu_rpc")
    runs, result = serve_and_call(url, queue, url)
    assert result == "done"
    assert runs.count == 2
    assert lost(caplog, "link") == [] and lost(caplog, "client") == []


def test_a_long_event_handler_keeps_the_connection_of_a_server_with_a_pool(
    url: str, queue: str, private_rabbit: PrivateRabbit, caplog: pytest.LogCaptureFixture
) -> None:
    """Event handlers run on the consuming thread whatever the server's concurrency:
    its heartbeater beats for them too, or the broker would close the connection
    mid-handler and deliver the event again (and again)."""
    caplog.set_level(logging.INFO, logger="kombu_rpc")
    runs = Runs()
    handled: list[float] = []
    exchange = unique_queue_name("test.heartbeats.events")
    registry = Registry()

    @registry.subscribe(exchange, "#", group="g")
    def handle(event: Event) -> None:
        handled.append(event.payload)
        runs.long_call(event.payload)

    server = RPCServer(url, registry=registry, queue=queue, concurrency=2)
    with server.running():
        with EventPublisher(private_rabbit.url, exchange, "topic") as events:
            events.publish("long", CALL_SECONDS)
            events.publish("short", 0)
        assert runs.wait(2, 4 * CALL_SECONDS)
    assert handled == [CALL_SECONDS, 0]  # each event once: the long one was not delivered again
    assert lost(caplog, "server") == []
