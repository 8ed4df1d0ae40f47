"""The proxy's Redis link: callers read their own replies, the link's thread reads for
calls nobody waits on, wakes up at close, and reconnects after a lost connection."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import wait
from time import monotonic
from typing import Any

import pytest
from kombu import Connection

from kombu_rpc import CallError, RPCProxy, RPCServer, RPCTimeout
from kombu_rpc._client import Client
from kombu_rpc._links import turns

from ..conftest import Gate
from .tcpproxy import TCPProxy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _redis_only(broker_url: str) -> None:
    if not broker_url.startswith("redis"):
        pytest.skip("the Redis link: the other brokers have links of their own")


@pytest.fixture
def reader_threads(monkeypatch: pytest.MonkeyPatch) -> list[threading.Thread]:
    """The threads that handled replies, in order (request it before the proxy)."""
    seen: list[threading.Thread] = []
    on_reply = Client._on_reply

    def spy(self: Client, *args: Any) -> None:
        seen.append(threading.current_thread())
        on_reply(self, *args)

    monkeypatch.setattr(Client, "_on_reply", spy)
    return seen


def test_a_caller_reads_its_own_reply(
    reader_threads: list[threading.Thread], serve: Callable[..., RPCServer], proxy: RPCProxy
) -> None:
    serve()
    assert [proxy.echo(i) for i in range(20)] == list(range(20))
    # no hand-off from a listener thread: the calling thread read every reply
    assert reader_threads == [threading.current_thread()] * 20


def test_calls_nobody_waits_on_are_read_by_the_link(
    reader_threads: list[threading.Thread], serve: Callable[..., RPCServer], proxy: RPCProxy
) -> None:
    serve(concurrency=4)
    futures = [proxy.echo.call_async(i) for i in range(200)]
    # concurrent.futures.wait does not read the connection: the link's thread must
    assert not wait(futures, timeout=30).not_done
    assert [f.result() for f in futures] == list(range(200))
    assert {thread.name for thread in reader_threads} == {"kombu_rpc-link"}


def test_close_wakes_the_reading_thread_at_once(
    serve: Callable[..., RPCServer],
    proxies: Callable[..., RPCProxy],
    gate: Gate,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No read ends by itself within the test: close returns quickly only if it wakes
    # the link's thread, which reads for the held call.
    monkeypatch.setattr(turns, "IDLE_WAIT", 3600.0)
    serve()
    proxy = proxies(timeout=30)
    held = proxy.held.call_async("held")
    gate.wait_entered()
    began = monotonic()
    proxy.close()
    assert monotonic() - began < 5
    with pytest.raises(CallError, match="proxy closed"):
        held.result(0)


def test_a_stalled_reply_connection_ends_calls_by_their_timeout(
    broker_url: str, serve: Callable[..., RPCServer], queue_name: str
) -> None:
    """Only this proxy's connections go through the TCP proxy (nobody else's stall)."""
    serve()
    with TCPProxy.for_url(broker_url) as tcp:
        # A connection stalled while it holds kombu's restore mutex leaves the key behind
        # for its 300 s expiry, and no other process restores unacked messages until
        # then: this proxy's mutex is its own.
        conn = Connection(
            tcp.url(broker_url),
            transport_options={"unacked_mutex_key": f"test.unacked_mutex.{queue_name}"},
        )
        with RPCProxy(conn, queue=queue_name, timeout=1.5) as proxy:
            assert proxy.echo("before") == "before"
            tcp.stall()
            try:
                for _ in range(2):
                    began = monotonic()
                    with pytest.raises(RPCTimeout):
                        proxy.echo("stalled")
                    assert monotonic() - began < 1.5 + 1.0
            finally:
                tcp.resume()
            # the connections survived (or were replaced): calls succeed again
            assert [proxy.echo(i) for i in range(5)] == list(range(5))


@pytest.fixture
def named_broker(broker_url: str) -> Iterator[tuple[Connection, Callable[[], int]]]:
    """A broker connection whose clients go through a TCP proxy of their own, and a
    function that resets every connection through it (none of anybody else's), on
    any kombu (naming clients, ``client_name``, needs kombu 5.6)."""
    with TCPProxy.for_url(broker_url) as tcp:

        def drop() -> int:
            count = tcp.connections
            tcp.sever()
            return count

        yield Connection(tcp.url(broker_url)), drop


def test_after_a_lost_connection_calls_succeed_again(
    serve: Callable[..., RPCServer],
    queue_name: str,
    named_broker: tuple[Connection, Callable[[], int]],
    log_waiter: Callable[[str], Any],
) -> None:
    serve()
    conn, drop = named_broker
    reconnected = log_waiter("the proxy reconnected")
    with RPCProxy(conn, queue=queue_name, timeout=5) as proxy:
        assert proxy.echo("before") == "before"
        assert drop() >= 2  # the link's and the publisher's
        # the reply queue, a Redis list, outlives the connections: the next calls
        # succeed once the link's thread reconnected (the publisher reconnects by itself)
        assert [proxy.echo(i) for i in range(20)] == list(range(20))
        assert reconnected.seen.is_set()
