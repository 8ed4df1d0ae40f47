"""The pure parts of cancellation, without a broker: the server's expiring set of
cancelled ids, the call context's view of it, the cancel message, the call futures,
and the dispatcher's handling of cancelled calls."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError
from typing import Any

import pytest
from kombu import Connection

from kombu_rpc import Registry, protocol
from kombu_rpc._cancelling import CancelListener
from kombu_rpc._cancels import MAX_TTL, CancelledCalls
from kombu_rpc._dispatch import Dispatcher
from kombu_rpc._execution import EventLoop
from kombu_rpc._pending import PendingCalls
from kombu_rpc.codecs import Envelope
from kombu_rpc.context import CallContext

from .test_dispatch import FakeMessage, request

pytestmark = pytest.mark.timeout(10)


# -- the expiring set -------------------------------------------------------------------


def test_an_added_id_is_cancelled_and_others_are_not() -> None:
    cancels = CancelledCalls()
    cancels.add("a", time.time() + 30)
    assert "a" in cancels
    assert "b" not in cancels
    assert len(cancels) == 1


def test_an_id_is_forgotten_at_its_deadline() -> None:
    cancels = CancelledCalls()
    cancels.add("past", time.time() - 1)  # already due: gone at the next add
    cancels.add("later", time.time() + 30)
    assert "past" not in cancels
    assert "later" in cancels


def test_an_id_without_deadline_is_kept_for_the_longest_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("kombu_rpc._cancels.monotonic", lambda: now[0])
    cancels = CancelledCalls()
    cancels.add("forever")
    now[0] += MAX_TTL - 1
    cancels.add("other")
    assert "forever" in cancels
    now[0] += 2
    cancels.add("third")
    assert "forever" not in cancels


def test_the_set_is_bounded_forgetting_the_ids_due_first() -> None:
    cancels = CancelledCalls(max_ids=3)
    for n, seconds in enumerate([50, 10, 40, 30]):
        cancels.add(f"id{n}", time.time() + seconds)
    assert len(cancels) == 3
    assert "id1" not in cancels  # due first
    assert {"id0", "id2", "id3"} <= {f"id{n}" for n in range(4) if f"id{n}" in cancels}


def test_cancelling_an_id_again_keeps_the_later_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr("kombu_rpc._cancels.monotonic", lambda: now[0])
    monkeypatch.setattr("kombu_rpc._cancels.time", lambda: now[0])
    cancels = CancelledCalls()
    cancels.add("a", 100.0)
    cancels.add("a", 10.0)  # an earlier deadline does not shorten it
    now[0] = 50.0
    cancels.add("b", 200.0)
    assert "a" in cancels
    now[0] = 150.0
    cancels.add("c", 200.0)
    assert "a" not in cancels


def test_the_hook_hears_each_cancel() -> None:
    heard: list[str] = []
    cancels = CancelledCalls(on_cancel=heard.append)
    cancels.add("a")
    cancels.add("b", time.time() + 5)
    assert heard == ["a", "b"]


def test_wait_returns_once_the_id_is_cancelled() -> None:
    cancels = CancelledCalls()
    assert not cancels.wait("a", 0.01)
    threading.Timer(0.05, cancels.add, ("a",)).start()
    assert cancels.wait("a", 5)


# -- the call context ---------------------------------------------------------------------


def test_a_call_context_reads_its_servers_cancels() -> None:
    cancels = CancelledCalls()
    call = CallContext("a", "slow", _cancels=cancels)
    assert not call.cancelled
    assert not call.wait_cancelled(0)
    cancels.add("a")
    assert call.cancelled
    assert call.wait_cancelled(None)
    assert call == CallContext("a", "slow")  # the set is no part of its value


def test_a_call_context_outside_a_server_is_never_cancelled() -> None:
    call = CallContext("a", "slow")
    assert not call.cancelled
    assert not call.wait_cancelled(0.01)
    with pytest.raises(ValueError, match="never ends"):
        call.wait_cancelled(None)
    with pytest.raises(ValueError, match="timeout"):
        call.wait_cancelled(-1)


# -- the cancel message -------------------------------------------------------------------


def test_a_cancel_message_carries_the_call_id_and_deadline() -> None:
    message = FakeMessage(b"", headers=protocol.cancel_headers(123.5), correlation_id="call-9")
    assert protocol.read_cancel(message) == ("call-9", 123.5)
    message = FakeMessage(b"", headers=protocol.cancel_headers(None), correlation_id="call-9")
    assert protocol.read_cancel(message) == ("call-9", None)


@pytest.mark.parametrize(
    ("headers", "correlation_id"),
    [
        (dict(protocol.WAKE_HEADERS), "call-9"),  # a wake-up
        ({}, "call-9"),
        (protocol.cancel_headers(None), None),
        ({**protocol.cancel_headers(None), protocol.DEADLINE_HEADER: "soon"}, "call-9"),
    ],
    ids=["wake-up", "no-header", "no-call-id", "bad-deadline"],
)
def test_other_messages_are_no_cancel(headers: dict[str, Any], correlation_id: str | None) -> None:
    assert protocol.read_cancel(FakeMessage(b"", headers=headers, correlation_id=correlation_id)) is None


# -- the calling side -----------------------------------------------------------------------


def test_cancelling_a_call_future_abandons_its_call_once() -> None:
    abandoned: list[tuple[str, str]] = []
    pending = PendingCalls(on_cancel=lambda queue, cid: abandoned.append((queue, cid)))
    future = pending.add("c1", "slow", None, queue="q")
    assert not future.running()  # it never runs: it can be cancelled until done
    assert future.cancel()
    assert future.cancel()  # again: still cancelled, not abandoned twice
    assert abandoned == [("q", "c1")]
    with pytest.raises(CancelledError):
        future.result(0)


def test_a_reply_to_a_cancelled_call_is_ignored() -> None:
    pending = PendingCalls()
    future = pending.add("c1", "slow", None, queue="q")
    entry = pending.pop("c1")
    assert entry is not None
    future.cancel()
    entry.resolve(42)  # the reply raced the cancel: no error, still cancelled
    entry.reject(RuntimeError("late"))
    assert future.cancelled()


def test_a_finished_call_future_cannot_be_cancelled() -> None:
    abandoned: list[tuple[str, str]] = []
    pending = PendingCalls(on_cancel=lambda queue, cid: abandoned.append((queue, cid)))
    future = pending.add("c1", "fib", None, queue="q")
    entry = pending.pop("c1")
    assert entry is not None
    entry.resolve(55)
    assert not future.cancel()
    assert abandoned == []


# -- the serving side -----------------------------------------------------------------------


@pytest.fixture
def registry() -> Registry:
    reg = Registry()

    @reg.remote
    def add(a: int, b: int) -> int:
        return a + b

    return reg


def test_a_request_cancelled_before_it_runs_is_dropped_unanswered(registry: Registry) -> None:
    dispatcher = Dispatcher(registry, Envelope(), "server-1", "q")
    job = dispatcher.prepare(request("add", 1, 2))
    assert dispatcher.run(job) is not None
    dispatcher.cancels.add("call-1")
    assert job[2].cancelled
    assert dispatcher.run(job) is None  # not run, not answered: its request is acked


def test_an_async_call_on_the_event_loop_is_cancelled_by_its_id() -> None:
    loop = EventLoop()
    cancels = CancelledCalls(on_cancel=loop.cancel)
    started, cancelled = threading.Event(), threading.Event()
    reg = Registry()

    @reg.remote
    async def sleeping() -> None:
        import asyncio

        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    dispatcher = Dispatcher(reg, Envelope(), "server-1", "q", run_coroutine=loop.run, cancels=cancels)
    job = dispatcher.prepare(request("sleeping"))
    replies: list[Any] = []
    runner = threading.Thread(target=lambda: replies.append(dispatcher.run(job)))
    runner.start()
    try:
        assert started.wait(5)
        cancels.add("call-1")
        runner.join(5)
        assert cancelled.wait(5)
        assert replies == [None]  # cancelled: no reply
    finally:
        loop.stop()


def test_a_server_with_a_secret_hears_only_signed_cancels() -> None:
    secret = b"0123456789abcdef-secret"
    cancels = CancelledCalls()
    listener = CancelListener(Connection("memory://"), "q", "s1", cancels, secret, 60.0, {}, threading.Lock())

    def cancel(headers: dict[str, Any]) -> FakeMessage:
        wake = protocol.WAKE_UP
        return FakeMessage(
            wake.payload,
            wake.content_type,
            wake.content_encoding,
            headers,
            reply_to=None,
            correlation_id="c1",
        )

    listener._on_message(cancel(protocol.cancel_headers(None)))  # unsigned
    assert "c1" not in cancels
    forged = protocol.cancel_headers(None)
    forged.update(
        protocol.signature_headers(b"another-secret-of-16", "cancel", protocol.WAKE_UP, "c1", "", None)
    )
    listener._on_message(cancel(forged))
    assert "c1" not in cancels
    signed = protocol.cancel_headers(None)
    signed.update(protocol.signature_headers(secret, "cancel", protocol.WAKE_UP, "c1", "", None))
    listener._on_message(cancel(signed))
    assert "c1" in cancels
