"""The proxy's AMQP link: callers read their own replies, the link's thread reads for
calls nobody waits on, and confirms and nacks are handled as they arrive."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait

import pytest

from kombu_rpc import ConnectionLostError, RPCProxy, RPCServer

from .conftest import refusing_queue

pytestmark = pytest.mark.timeout(60)
#: The link is the AMQP client: ``broker_url`` covers RabbitMQ only.
AMQP_ONLY = True


@pytest.fixture
def full_queue(broker_url: str, queue_name: str) -> Iterator[str]:
    """A queue that refuses every message: the broker nacks what is published to it."""
    with refusing_queue(broker_url, queue_name) as name:
        yield name


def test_a_request_the_broker_nacks_fails_at_once(full_queue: str, proxies: Callable[..., RPCProxy]) -> None:
    proxy = proxies(queue=full_queue, timeout=30)
    with pytest.raises(ConnectionLostError, match="refused"):
        proxy.fib(1)  # not RPCTimeout after 30 s: the pytest timeout is 60 s
    with pytest.raises(ConnectionLostError, match="refused"):
        proxy.fib.cast(1)
    with pytest.raises(ConnectionLostError, match="refused"):
        proxy.fib.call_async(1).result(30)


def test_calls_nobody_waits_on_are_read_by_the_link(serve: Callable[..., RPCServer], proxy: RPCProxy) -> None:
    serve()
    futures = [proxy.echo.call_async(i) for i in range(200)]
    # concurrent.futures.wait does not read the connection: the link's thread must
    assert not wait(futures, timeout=30).not_done
    assert [f.result() for f in futures] == list(range(200))


def test_a_done_callback_can_call_again(serve: Callable[..., RPCServer], proxy: RPCProxy) -> None:
    # the callback runs in the thread that read the reply, inside the link's I/O lock
    serve()
    second: list[Future[object]] = []
    ready = threading.Event()

    def again(_: Future[object]) -> None:
        second.append(proxy.echo.call_async("second"))
        ready.set()

    proxy.echo.call_async("first").add_done_callback(again)
    assert ready.wait(30)
    assert second[0].result(30) == "second"
