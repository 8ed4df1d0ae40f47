"""Cancelling calls (docs/cancellation.md), on memory:// and on every real broker: the
caller gets CancelledError at once, the server running the call hears of it, a request
still queued never runs, and a call whose server is gone cancels all the same."""

from __future__ import annotations

import _thread
import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from pathlib import Path
from time import monotonic
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kombu_rpc import AsyncRPCProxy, Registry, RPCProxy, RPCServer, current_call, metrics
from kombu_rpc._client import Client
from kombu_rpc.topology import CANCEL_EXCHANGE_TEMPLATE, CANCEL_QUEUE_TEMPLATE, HELD_CANCELS_TEMPLATE

from ..conftest import Gate, LogWaiter, Recorder
from .tcpproxy import TCPProxy
from .test_leftovers import Broker
from .test_transports import stop, wait_ready

pytestmark = pytest.mark.timeout(60)

Serve = Callable[..., RPCServer]
#: "At once": far below any broker round trip a server would need to answer.
AT_ONCE = 1.0
SERVER_PROGRAM = Path(__file__).with_name("transport_server.py")
REPO = Path(__file__).resolve().parents[2]


class Seen:
    """What the remote functions of these tests saw."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()  # a function saw its call cancelled
        self.counted = 0


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def registry(gate: Gate, recorder: Recorder, seen: Seen) -> Registry:
    reg = Registry()

    @reg.remote
    def fib(n: int) -> int:
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a

    @reg.remote
    def polling() -> str:
        """Works in steps, checking between them whether it was cancelled."""
        gate.entered.release()
        call = current_call()
        assert call is not None
        give_up = monotonic() + 20
        while not call.cancelled:
            if monotonic() > give_up:
                return "never cancelled"
            threading.Event().wait(0.01)  # one step of work
        seen.cancelled.set()
        return "stopped"

    @reg.remote
    def waiting() -> bool:
        """Waits for its cancel."""
        gate.entered.release()
        call = current_call()
        assert call is not None
        cancelled = call.wait_cancelled(20)
        if cancelled:
            seen.cancelled.set()
        return cancelled

    @reg.remote
    async def sleeping() -> None:
        gate.entered.release()
        try:
            await asyncio.sleep(20)
        except asyncio.CancelledError:
            seen.cancelled.set()
            raise

    @reg.remote
    def count() -> None:
        seen.counted += 1

    return reg


def cancel_at_once(future: Future[Any]) -> None:
    """Cancel ``future``: it ends at once with CancelledError."""
    began = monotonic()
    assert future.cancel()
    assert future.cancelled()
    with pytest.raises(CancelledError):
        future.result(timeout=AT_ONCE)
    assert monotonic() - began < AT_ONCE


def test_a_running_sync_call_sees_its_cancel_and_the_server_serves_on(
    serve: Serve, proxy: RPCProxy, gate: Gate, seen: Seen
) -> None:
    serve()
    future = proxy.polling.call_async()
    gate.wait_entered()
    cancel_at_once(future)
    assert seen.cancelled.wait(10), "the server never saw the cancel"
    assert proxy.fib(10) == 55


def test_a_sync_call_can_wait_for_its_cancel(serve: Serve, proxy: RPCProxy, gate: Gate, seen: Seen) -> None:
    serve(concurrency=2)
    future = proxy.waiting.call_async()
    gate.wait_entered()
    cancel_at_once(future)
    assert seen.cancelled.wait(10)
    assert proxy.fib(10) == 55


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_running_async_call_has_its_task_cancelled(
    serve: Serve, proxy: RPCProxy, gate: Gate, seen: Seen, concurrency: int
) -> None:
    serve(concurrency=concurrency)
    future = proxy.sleeping.call_async()
    gate.wait_entered()
    cancel_at_once(future)
    assert seen.cancelled.wait(10), "the task was never cancelled"
    assert proxy.fib(10) == 55


def test_a_request_still_queued_when_cancelled_never_runs(
    serve: Serve, proxy: RPCProxy, gate: Gate, seen: Seen
) -> None:
    serve(concurrency=1)
    busy = proxy.waiting.call_async()
    gate.wait_entered()
    queued = proxy.count.call_async()  # waits behind the busy call
    cancel_at_once(queued)
    # Cancels reach a server in the order they were made: once the busy call saw its
    # own, the server knew of the queued one's.
    cancel_at_once(busy)
    assert seen.cancelled.wait(10)
    assert proxy.fib(10) == 55  # taken after the queued request
    assert seen.counted == 0


def test_a_request_cancelled_while_no_server_runs_never_runs(
    broker_url: str, registry: Registry, queue_name: str, proxy: RPCProxy, seen: Seen
) -> None:
    with RPCServer(broker_url, registry=registry, queue=queue_name).running():
        pass  # the request queue exists; no server runs from here
    queued = proxy.count.call_async()
    cancel_at_once(queued)
    # RabbitMQ and memory://: the cancel waits in the queue's held cancels, which a
    # server reads before it takes a request; Redis: the request was taken back
    proxy._client._canceller.close()  # sent (it is sent in the background)
    with RPCServer(broker_url, registry=registry, queue=queue_name).running():
        assert proxy.fib(10) == 55  # taken after the cancelled request
        with RPCServer(broker_url, registry=registry, queue=queue_name).running():
            pass  # a second server reads the held cancel too (and leaves it)
    assert seen.counted == 0


def test_a_cancelled_call_does_not_cancel_the_others(
    serve: Serve, proxy: RPCProxy, gate: Gate, seen: Seen
) -> None:
    serve(concurrency=2)
    kept = proxy.waiting.call_async()
    cancelled = proxy.polling.call_async()
    gate.wait_entered(2)
    cancel_at_once(cancelled)
    assert seen.cancelled.wait(10)
    assert not kept.done()
    cancel_at_once(kept)


def test_an_interrupted_blocking_call_is_cancelled(
    serve: Serve, proxy: RPCProxy, gate: Gate, seen: Seen
) -> None:
    serve()

    def interrupt() -> None:  # Ctrl+C, once the call runs on the server
        if gate.entered.acquire(timeout=10):
            _thread.interrupt_main()

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        proxy.waiting()
    assert seen.cancelled.wait(10), "the server never saw the cancel"
    assert proxy.fib(10) == 55


def test_cancelling_a_finished_call_does_nothing(serve: Serve, proxy: RPCProxy) -> None:
    serve()
    future = proxy.fib.call_async(10)
    assert future.result(timeout=10) == 55
    assert not future.cancel()
    assert future.result() == 55


def test_a_call_whose_server_is_gone_cancels_at_once_and_leaves_nothing(
    broker_url: str, registry: Registry, queue_name: str
) -> None:
    with RPCServer(broker_url, registry=registry, queue=queue_name).running():
        pass  # the request queue stays; no server consumes it any more
    broker = Broker(broker_url)
    try:
        proxy = RPCProxy(broker_url, queue=queue_name, timeout=10)
        future = proxy.count.call_async()
        cancel_at_once(future)
        began = monotonic()
        proxy.close()  # sends what cancels it has, without hanging
        assert monotonic() - began < 10
        assert not broker.has_exchange(CANCEL_EXCHANGE_TEMPLATE.format(queue=queue_name))
        # the cancel waits for the next server where exchanges are kept (the queue of
        # held cancels expires by itself); on Redis the request was taken back instead
        held = HELD_CANCELS_TEMPLATE.format(queue=queue_name)
        assert broker.has_queue(held) is (broker.redis is None)
        assert "kombu_rpc-cancels" not in {thread.name for thread in threading.enumerate()}
    finally:
        broker.close()


@pytest.fixture
def killable_server(
    real_broker_url: str, queue_name: str, tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A server of ``queue_name`` in a process of its own, that the test may kill."""
    log = tmp_path / "server.log"
    pythonpath = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH", ""))))
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(SERVER_PROGRAM), json.dumps({"url": real_broker_url}), queue_name],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": pythonpath},
        )
    try:
        wait_ready(process, log, queue_name)
        yield process
    finally:
        stop(process)


def test_a_call_whose_server_was_killed_cancels_at_once(
    real_broker_url: str, queue_name: str, killable_server: subprocess.Popen[bytes]
) -> None:
    proxy = RPCProxy(real_broker_url, queue=queue_name, timeout=30)
    try:
        assert proxy.echo("ready") == "ready"
        future = proxy.sleep.call_async(20)
        killable_server.kill()
        killable_server.wait(10)
        cancel_at_once(future)
        cancel_at_once(proxy.echo.call_async("no server"))
    finally:
        began = monotonic()
        proxy.close()  # nothing hangs
        assert monotonic() - began < 10


def test_a_cancelled_task_cancels_its_call_on_the_async_proxy(
    serve: Serve, broker_url: str, queue_name: str, gate: Gate, seen: Seen
) -> None:
    serve()

    async def main() -> None:
        async with AsyncRPCProxy(broker_url, queue=queue_name, timeout=10) as proxy:
            task = asyncio.ensure_future(proxy.sleeping())
            await asyncio.to_thread(gate.wait_entered)
            began = monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert monotonic() - began < AT_ONCE
            assert await asyncio.to_thread(seen.cancelled.wait, 10), "the server never saw the cancel"
            seen.cancelled.clear()
            # a future from call_async cancels the same way
            future = await proxy.polling.call_async()
            await asyncio.to_thread(gate.wait_entered)
            future.cancel()
            assert await asyncio.to_thread(seen.cancelled.wait, 10)
            assert await proxy.fib(10) == 55

    asyncio.run(main(), debug=True)


def test_cancels_are_signed_when_calls_are(
    serve: Serve, proxies: Callable[..., RPCProxy], gate: Gate, seen: Seen
) -> None:
    secret = "0123456789abcdef-secret"
    serve(secret=secret)
    proxy = proxies(secret=secret)
    future = proxy.polling.call_async()
    gate.wait_entered()
    cancel_at_once(future)
    assert seen.cancelled.wait(10)


def test_a_stopped_server_leaves_no_cancel_queue(
    broker_url: str, registry: Registry, queue_name: str
) -> None:
    server = RPCServer(broker_url, registry=registry, queue=queue_name)
    with server.running():
        pass
    broker = Broker(broker_url)
    try:
        assert not broker.has_queue(
            CANCEL_QUEUE_TEMPLATE.format(queue=queue_name, server_id=server.server_id)
        )
        assert not broker.has_exchange(CANCEL_EXCHANGE_TEMPLATE.format(queue=queue_name))
    finally:
        broker.close()


def test_a_task_cancelled_while_its_request_is_sent_cancels_the_call_once_sent(
    serve: Serve, broker_url: str, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve()
    sending, release = threading.Event(), threading.Event()
    abandoned: list[str] = []
    original_call, original_abandon = Client.call, Client.abandon

    def call(self: Client, queue: str, method: str, *args: Any, **kwargs: Any) -> Future[Any]:
        if method == "waiting":  # hold the proxy's worker thread while it sends
            sending.set()
            assert release.wait(20)
        return original_call(self, queue, method, *args, **kwargs)

    def abandon(self: Client, queue: str, correlation_id: str) -> None:
        abandoned.append(correlation_id)
        original_abandon(self, queue, correlation_id)

    monkeypatch.setattr(Client, "call", call)
    monkeypatch.setattr(Client, "abandon", abandon)

    async def main() -> None:
        async with AsyncRPCProxy(broker_url, queue=queue_name, timeout=10) as proxy:
            task = asyncio.ensure_future(proxy.waiting())
            assert await asyncio.to_thread(sending.wait, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            release.set()
            assert await proxy.fib(10) == 55  # sent after the cancelled call, on the same thread
            assert len(abandoned) == 1

    asyncio.run(main(), debug=True)


def test_a_cancelled_call_is_counted_as_cancelled(
    serve: Serve, proxy: RPCProxy, gate: Gate, seen: Seen
) -> None:
    counted = CollectorRegistry()
    metrics.enable(counted)
    try:
        serve()
        future = proxy.polling.call_async()
        gate.wait_entered()
        cancel_at_once(future)  # counted by the future's callback, as it is cancelled
        labels = {"queue": proxy.queue, "method": "polling", "outcome": "cancelled"}
        assert counted.get_sample_value("kombu_rpc_client_calls_total", labels) == 1
        assert counted.get_sample_value("kombu_rpc_client_calls_in_flight", {"queue": proxy.queue}) == 0
        assert seen.cancelled.wait(10)
    finally:
        metrics.disable()


def test_cancels_are_heard_again_once_the_listener_reconnected(
    real_broker_url: str,
    registry: Registry,
    queue_name: str,
    gate: Gate,
    seen: Seen,
    log_waiter: Callable[[str], LogWaiter],
) -> None:
    with TCPProxy.for_url(real_broker_url) as tcp:
        # Given a server that reaches the broker through a TCP proxy
        server = RPCServer(tcp.url(real_broker_url), registry=registry, queue=queue_name)
        with server.running(), RPCProxy(real_broker_url, queue=queue_name, timeout=10) as proxy:
            listener = server._consumer._cancel_listener
            assert listener is not None
            lost = log_waiter("the cancel listener reconnects")
            # When its connections are cut
            tcp.sever()
            assert lost.seen.wait(10)
            assert listener.ready.wait(20), "the cancel listener did not reconnect"
            # Then a call it runs is cancelled as before
            future = proxy.polling.call_async()
            gate.wait_entered(timeout=20)
            cancel_at_once(future)
            assert seen.cancelled.wait(10)
