"""Streamed results, run on memory:// and on every real broker: remote generators
iterated with ``proxy.f.stream(...)`` and ``async for``, their failures, early stops and
idle timeouts, and streams whose server is killed or whose connection is cut."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from time import monotonic
from typing import Any

import pytest
from kombu import Queue

from kombu_rpc import (
    AsyncRPCProxy,
    IdleTimeout,
    Registry,
    RemoteError,
    RPCError,
    RPCProxy,
    RPCServer,
    RPCTimeout,
)
from kombu_rpc._client import Client
from kombu_rpc.connection import connect

from ..conftest import LogWaiter, broker_id
from .tcpproxy import TCPProxy
from .test_transports import REPO, stop, wait_ready

pytestmark = pytest.mark.timeout(60)

Serve = Callable[..., RPCServer]
MakeProxy = Callable[..., RPCProxy]


@pytest.fixture
def streams() -> Registry:
    reg = Registry()

    @reg.remote
    def count(n: int) -> Iterator[int]:
        yield from range(n)

    @reg.remote
    async def acount(n: int) -> AsyncIterator[int]:
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    @reg.remote
    def failing(n: int) -> Iterator[int]:
        yield from range(n)
        raise ValueError(f"broke after {n}")

    @reg.remote
    def slow(n: int, pause: float) -> Iterator[int]:
        """Yields ``pause`` seconds apart: alive, but quiet between items."""
        for i in range(n):
            if i:
                time.sleep(pause)
            yield i

    @reg.remote
    def plain(value: Any) -> Any:
        return value

    return reg


@pytest.mark.parametrize("concurrency", [1, 4])
@pytest.mark.parametrize("method", ["count", "acount"])
def test_a_stream_yields_every_item_in_order(
    serve: Serve, proxy: RPCProxy, streams: Registry, method: str, concurrency: int
) -> None:
    serve(registry=streams, concurrency=concurrency)
    assert list(proxy[method].stream(50)) == list(range(50))
    assert list(proxy[method].stream(0)) == []


def test_concurrent_streams_keep_their_own_items(serve: Serve, proxy: RPCProxy, streams: Registry) -> None:
    serve(registry=streams, concurrency=4)
    results: dict[int, list[int]] = {}

    def consume(n: int) -> None:
        results[n] = list(proxy.count.stream(n))

    threads = [threading.Thread(target=consume, args=(n,)) for n in (5, 30, 60, 90)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == {n: list(range(n)) for n in (5, 30, 60, 90)}


def test_a_plain_call_of_a_generator_returns_its_items_as_a_list(
    serve: Serve, proxy: RPCProxy, streams: Registry
) -> None:
    serve(registry=streams)
    assert proxy.count(4) == [0, 1, 2, 3]
    assert proxy.acount(3) == [0, 1, 2]


def test_a_failure_mid_stream_raises_after_the_items_sent_before(
    serve: Serve, proxy: RPCProxy, streams: Registry
) -> None:
    serve(registry=streams)
    received = []
    with pytest.raises(RemoteError) as info:
        for item in proxy.failing.stream(3):
            received.append(item)
    assert received == [0, 1, 2]
    assert (info.value.exc_type, info.value.exc_message) == ("ValueError", "broke after 3")


def test_streaming_a_function_that_is_no_generator_fails_clearly(
    serve: Serve, proxy: RPCProxy, streams: Registry
) -> None:
    serve(registry=streams)
    with pytest.raises(RemoteError, match="NotAStream"):
        list(proxy.plain.stream(1))


def test_breaking_out_early_ends_the_call_here_and_drops_its_late_items_quietly(
    serve: Serve,
    proxy: RPCProxy,
    streams: Registry,
    monkeypatch: pytest.MonkeyPatch,
    log_waiter: Callable[[str], LogWaiter],
) -> None:
    serve(registry=streams)
    abandoned: list[str] = []
    original = Client.abandon

    def spy(self: Client, queue: str, correlation_id: str) -> None:
        abandoned.append(correlation_id)
        original(self, queue, correlation_id)

    monkeypatch.setattr(Client, "abandon", spy)
    late = log_waiter("dropped a late or duplicate reply")
    over = log_waiter("which is over")
    for item in proxy.slow.stream(50, 0.01):  # still running at the break
        if item == 2:
            break
    assert len(abandoned) == 1  # at once: the loop dropped the only reference
    assert proxy.plain("after") == "after"  # the proxy goes on; the stream's rest is dropped
    stream = proxy.slow.stream(5, 0.01)
    assert next(stream) == 0
    stream.close()
    stream.close()
    assert list(stream) == [] and len(abandoned) == 2
    with proxy.count.stream(3) as whole:
        assert list(whole) == [0, 1, 2]
    assert len(abandoned) == 2  # a stream that ended has nothing to stop
    assert proxy.plain("end") == "end"
    # items of the stopped streams that came late (before their server heard the
    # cancel) were dropped quietly
    assert not late.seen.is_set() and not [r for r in over.records if r.levelno > logging.DEBUG]


class Producer:
    """A remote generator that counts what it yielded and says when it stopped."""

    def __init__(self) -> None:
        self.produced = 0
        self.stopped = threading.Event()

    def register(self, registry: Registry) -> None:
        @registry.remote
        def endless(pause: float) -> Iterator[int]:
            try:
                while True:
                    self.produced += 1
                    yield self.produced
                    time.sleep(pause)
            finally:
                self.stopped.set()

        @registry.remote
        async def aendless(pause: float) -> AsyncIterator[int]:
            try:
                while True:
                    self.produced += 1
                    yield self.produced
                    await asyncio.sleep(pause)
            finally:
                self.stopped.set()


@pytest.mark.parametrize("concurrency", [1, 4])
@pytest.mark.parametrize("function", ["endless", "aendless"])
def test_stopping_a_stream_early_stops_its_server_producing(
    serve: Serve, proxy: RPCProxy, concurrency: int, function: str
) -> None:
    registry = Registry()
    producer = Producer()
    producer.register(registry)
    serve(registry=registry, concurrency=concurrency)
    for item in proxy[function].stream(0.01):
        if item == 3:
            break
    # the generator was closed at its next item: it did not run on to the deadline
    assert producer.stopped.wait(10)
    stopped_at = producer.produced
    assert stopped_at < 500


def test_a_stream_past_its_deadline_stops_its_server_producing(serve: Serve, proxies: MakeProxy) -> None:
    registry = Registry()
    producer = Producer()
    producer.register(registry)
    serve(registry=registry)
    proxy = proxies(timeout=1.5)
    with pytest.raises(RPCTimeout):
        for _ in proxy.endless.stream(0.5):
            pass
    assert producer.stopped.wait(10), "the server ran on after the caller's timeout"
    assert producer.produced < 10


def test_cancelling_the_task_of_an_async_for_stops_the_server(
    serve: Serve, broker_url: str, queue_name: str
) -> None:
    registry = Registry()
    producer = Producer()
    producer.register(registry)
    serve(registry=registry)

    async def main() -> None:
        async with AsyncRPCProxy(broker_url, queue=queue_name, timeout=30) as proxy:
            started = asyncio.Event()

            async def consume() -> None:
                async for _ in proxy.endless.stream(0.01):
                    started.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(started.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert producer.stopped.wait(10)


def test_the_stream_deadline_covers_the_whole_stream(
    serve: Serve, proxies: MakeProxy, streams: Registry
) -> None:
    serve(registry=streams)
    proxy = proxies(timeout=0.5)
    received = []
    started = monotonic()
    with pytest.raises(RPCTimeout) as info:
        for item in proxy.slow.stream(100, 0.05):
            received.append(item)
    assert type(info.value) is RPCTimeout and monotonic() - started < 3
    assert received == list(range(len(received))) and received


def test_keepalives_keep_a_slow_but_alive_server_from_looking_dead(
    serve: Serve, proxies: MakeProxy, streams: Registry
) -> None:
    serve(registry=streams)
    proxy = proxies(idle_timeout=0.3)
    assert list(proxy.slow.stream(3, 0.7)) == [0, 1, 2]  # quiet for 0.7 s between items


def test_an_idle_timeout_fires_when_nothing_answers(
    broker_url: str, queue_name: str, proxies: MakeProxy
) -> None:
    """No server consumes the queue: nothing comes, not even keepalives."""
    with connect(broker_url) as conn:
        Queue(queue_name, routing_key=queue_name)(conn.default_channel).declare()
    proxy = proxies(idle_timeout=0.3, timeout=20)
    started = monotonic()
    with pytest.raises(IdleTimeout):
        list(proxy.count.stream(3))
    with pytest.raises(IdleTimeout):
        proxy.count(3)
    assert monotonic() - started < 4


def test_async_streams(
    serve: Serve, broker_url: str, queue_name: str, streams: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve(registry=streams, concurrency=2)
    abandoned: list[str] = []
    original = Client.abandon

    def spy(self: Client, queue: str, correlation_id: str) -> None:
        abandoned.append(correlation_id)
        original(self, queue, correlation_id)

    monkeypatch.setattr(Client, "abandon", spy)

    async def main() -> None:
        async with AsyncRPCProxy(broker_url, queue=queue_name, timeout=10) as proxy:
            assert [item async for item in proxy.count.stream(20)] == list(range(20))
            assert [item async for item in proxy.acount.stream(5)] == list(range(5))
            received = []
            with pytest.raises(RemoteError, match="broke after 2"):
                async for item in proxy.failing.stream(2):
                    received.append(item)
            assert received == [0, 1]
            async with proxy.slow.stream(50, 0.01) as stream:  # still running at the break
                async for item in stream:
                    if item == 1:
                        break
            assert len(abandoned) == 1
            async for item in proxy.slow.stream(50, 0.01):  # dropped: ends the call at once
                if item == 1:
                    break
            assert len(abandoned) == 2
            assert await proxy.plain("after") == "after"
            assert [item async for item in proxy.options(idle_timeout=0.3).slow.stream(2, 0.7)] == [0, 1]

    asyncio.run(main(), debug=True)


# -- a server killed, frozen or cut off mid-stream -----------------------------------------

STREAM_SERVER = Path(__file__).with_name("stream_server.py")


class ServerProcess:
    """A stream_server.py process."""

    def __init__(self, url: str, queue: str, log: Path) -> None:
        self.log = log
        pythonpath = os.environ.get("PYTHONPATH", "")
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(STREAM_SERVER), url, queue],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), pythonpath)))},
            )
        wait_ready(self.process, log, queue)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
        stop(self.process)


@pytest.fixture
def server_processes(tmp_path: Path) -> Iterator[Callable[[str, str], ServerProcess]]:
    started: list[ServerProcess] = []

    def start(url: str, queue: str) -> ServerProcess:
        started.append(ServerProcess(url, queue, tmp_path / f"server-{len(started)}.log"))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def killable_url(request: pytest.FixtureRequest, real_broker_url: str) -> str:
    """A broker whose server processes a test may kill: RabbitMQ requeues what a dead
    consumer held; on Redis the request would wait in the shared ``unacked`` table,
    so those tests use a private redis-server."""
    if broker_id(real_broker_url) == "redis":
        node = request.getfixturevalue("private_redis")
        return str(node.url)
    return real_broker_url


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_dead_or_frozen_server_is_noticed_within_the_idle_timeout(
    killable_url: str, queue_name: str, server_processes: Callable[[str, str], ServerProcess], how: str
) -> None:
    server = server_processes(killable_url, queue_name)
    with RPCProxy(killable_url, queue=queue_name, timeout=30, idle_timeout=1.0) as proxy:
        stream = proxy.ticks.stream(1000, 0.02)
        assert [next(stream) for _ in range(3)] == [0, 1, 2]
        if how == "killed":
            server.kill()
        else:
            server.signal(signal.SIGSTOP)  # keepalives stop too
        received = []
        started = monotonic()
        with pytest.raises(IdleTimeout):
            for item in stream:
                received.append(item)
        assert monotonic() - started < 1.0 + 2.0
        assert received == list(range(3, 3 + len(received)))  # in order, none twice


def test_a_killed_servers_stream_resumes_on_another_server_exactly_once(
    amqp_url: str, queue_name: str, server_processes: Callable[[str, str], ServerProcess]
) -> None:
    """RabbitMQ hands the unacknowledged request to the next server, which streams it
    again from the start: the caller drops the items it has, and goes on."""
    server = server_processes(amqp_url, queue_name)
    with RPCProxy(amqp_url, queue=queue_name, timeout=30) as proxy:
        stream = proxy.ticks.stream(60, 0.02)
        first = [next(stream) for _ in range(5)]
        server.kill()
        server_processes(amqp_url, queue_name)
        assert first + list(stream) == list(range(60))


@pytest.mark.parametrize("side", ["server", "proxy"])
def test_a_connection_cut_mid_stream(
    real_broker_url: str, queue_name: str, streams: Registry, side: str
) -> None:
    """The server's connection cut mid-stream: an item cannot be published, so the
    request is requeued unanswered; the server reconnects and runs it again, and the
    caller drops the items it has. The proxy's: on Redis it reads on after
    reconnecting; on RabbitMQ the reply queue went with the connection, so the call is
    sent again (``retry=True``), and streamed again from the start. Either way the
    caller gets each item once, in order."""
    with TCPProxy.for_url(real_broker_url) as tcp:
        via = tcp.url(real_broker_url)
        if side == "server":
            server = RPCServer(via, registry=streams, queue=queue_name)
            proxy = RPCProxy(real_broker_url, queue=queue_name, timeout=30, idle_timeout=5.0)
        else:
            server = RPCServer(real_broker_url, registry=streams, queue=queue_name)
            proxy = RPCProxy(via, queue=queue_name, timeout=30, idle_timeout=5.0, retry=True)
        with server.running(), proxy:
            stream = proxy.slow.stream(40, 0.02)
            received = [next(stream) for _ in range(5)]
            tcp.sever()
            try:
                received += list(stream)
            except RPCError as exc:  # the caller was told; what it got is still right
                outcome = f"{type(exc).__name__}: {exc}"
            else:
                outcome = "complete"
            assert received == list(range(len(received)))
            assert proxy.plain("after") == "after"
    print(f"\n  {side} cut mid-stream, {broker_id(real_broker_url)}: {outcome} after {len(received)} items")
    assert outcome == "complete"


def test_a_slow_stream_on_a_server_with_heartbeats_runs_once(amqp_url: str, queue_name: str) -> None:
    """The consuming thread publishes the items while its heartbeater beats for it
    (``concurrency=1``): they never write at once, and the broker never finds the
    connection silent, so the request is not delivered again."""
    runs: list[int] = []
    reg = Registry()

    @reg.remote
    def slow(n: int, pause: float) -> Iterator[int]:
        runs.append(n)
        for i in range(n):
            if i:
                time.sleep(pause)
            yield i

    server = RPCServer(f"{amqp_url}?heartbeat=1", registry=reg, queue=queue_name)
    with server.running(), RPCProxy(amqp_url, queue=queue_name, timeout=30) as proxy:
        assert list(proxy.slow.stream(6, 0.8)) == list(range(6))  # 4 s: 4 heartbeat intervals
        assert list(proxy.slow.stream(300, 0.002)) == list(range(300))
    assert runs == [6, 300]


def test_signed_streams_progress_and_keepalives(serve: Serve, proxies: MakeProxy, streams: Registry) -> None:
    """Every message of a signed call is signed, and checked by the caller."""
    secret = "0123456789abcdef-streams"
    serve(registry=streams, secret=secret, concurrency=2)
    proxy = proxies(secret=secret, idle_timeout=0.3)
    assert list(proxy.count.stream(20)) == list(range(20))
    assert list(proxy.slow.stream(2, 0.7)) == [0, 1]  # kept alive by signed keepalives


def test_streams_through_direct_reply_to(amqp_url: str, queue_name: str, streams: Registry) -> None:
    server = RPCServer(amqp_url, registry=streams, queue=queue_name, concurrency=2)
    with server.running(), RPCProxy(amqp_url, queue=queue_name, timeout=30, direct_reply_to=True) as proxy:
        assert list(proxy.count.stream(30)) == list(range(30))
        assert list(proxy.options(idle_timeout=0.3).slow.stream(2, 0.7)) == [0, 1]
