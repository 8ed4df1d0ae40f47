"""Streamed results, progress and idle timeouts without a broker: the wire helpers, the
caller's bookkeeping of a call's parts (order, duplicates, gaps, idle timeouts) and the
dispatcher running generators into a fake sink."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import TimeoutError as FuturesTimeout
from contextlib import contextmanager
from typing import Any

import pytest

from kombu_rpc import IdleTimeout, Registry, RemoteError, RPCTimeout, current_call, protocol
from kombu_rpc._dispatch import Dispatcher, Disposal, Refused, Reply
from kombu_rpc._execution import EventLoop
from kombu_rpc._pending import CallParts, PendingCalls
from kombu_rpc.codecs import Envelope
from kombu_rpc.errors import MalformedRequest

from .test_dispatch import request

pytestmark = pytest.mark.timeout(10)


# -- the caller's bookkeeping ----------------------------------------------------------


def test_items_are_kept_in_order_and_duplicates_dropped() -> None:
    parts = CallParts("count")
    for seq, value in [(0, "a"), (1, "b"), (0, "a"), (1, "b"), (2, "c")]:
        assert parts.item(seq, value) is None
    assert list(parts.items) == ["a", "b", "c"]
    assert parts.duplicates == 2 and parts.next_seq == 3
    assert parts.end(3) is None


def test_a_skipped_item_is_a_gap() -> None:
    parts = CallParts("count")
    assert parts.item(0, "a") is None
    error = parts.item(2, "c")
    assert isinstance(error, RemoteError) and error.exc_type == "StreamGap"
    assert "item 1" in str(error) and list(parts.items) == ["a"]


def test_an_end_counting_more_items_than_arrived_is_a_gap() -> None:
    parts = CallParts("count")
    parts.item(0, "a")
    error = parts.end(2)
    assert error is not None and error.exc_type == "StreamGap"


def test_progress_goes_to_the_callback_whose_errors_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Any] = []

    def on_progress(value: Any) -> None:
        seen.append(value)
        if value == "bad":
            raise ValueError("callback broke")

    parts = CallParts("job", on_progress=on_progress)
    parts.progress(0.5)
    parts.progress("bad")
    parts.progress(1.0)
    assert seen == [0.5, "bad", 1.0]
    assert "on_progress callback" in caplog.text


def test_every_message_moves_the_idle_deadline() -> None:
    parts = CallParts("job", idle_timeout=5.0)
    before = parts.idle_due()
    assert before is not None
    parts.seen()
    after = parts.idle_due()
    assert after is not None and after >= before
    assert CallParts("job").idle_due() is None


def test_a_silent_call_fails_at_its_idle_timeout_and_a_talking_one_does_not() -> None:
    pending = PendingCalls()
    try:
        silent = pending.add("silent", "job", None, parts=CallParts("job", idle_timeout=0.2))
        talking_parts = CallParts("job", idle_timeout=0.3)
        talking = pending.add("talking", "job", 5.0, parts=talking_parts)
        error = silent.exception(timeout=3)
        assert isinstance(error, IdleTimeout) and "idle_timeout" in str(error)
        stop = threading.Event()

        def talk() -> None:
            while not stop.wait(0.05):
                talking_parts.seen()

        talker = threading.Thread(target=talk)
        talker.start()
        try:
            assert not talking.done()
            with pytest.raises(FuturesTimeout):
                talking.exception(timeout=0.8)  # longer than its idle timeout
        finally:
            stop.set()
            talker.join()
        error = talking.exception(timeout=3)  # silent now: idle
        assert isinstance(error, IdleTimeout)
    finally:
        pending.close()


def test_the_overall_deadline_wins_over_a_kept_alive_call() -> None:
    pending = PendingCalls()
    try:
        parts = CallParts("job", idle_timeout=10.0)
        future = pending.add("c", "job", 0.2, parts=parts)
        error = future.exception(timeout=3)
        assert type(error) is RPCTimeout
    finally:
        pending.close()


# -- the wire ---------------------------------------------------------------------------


def test_wants_round_trip_and_are_checked() -> None:
    wants = protocol.Wants(stream=True, progress=True, keepalive=2.0)
    assert protocol.read_wants(wants.header()) == wants
    assert protocol.read_wants({}) == protocol.Wants()
    for bad in ["yes", {"stream": "yes"}, {"keepalive": 0}, {"keepalive": True}, {"keepalive": 1e9}]:
        with pytest.raises(MalformedRequest):
            protocol.read_wants(bad)


def test_keepalives_come_thrice_per_idle_timeout() -> None:
    assert protocol.keepalive_for(3.0) == 1.0
    assert protocol.keepalive_for(0.001) == protocol.MIN_KEEPALIVE


def test_parts_are_read_and_checked() -> None:
    assert protocol.read_part(protocol.part_headers(protocol.ITEM, 3)) == ("item", 3)
    assert protocol.read_part(protocol.part_headers(protocol.KEEPALIVE)) == ("keepalive", None)
    for bad in [
        {protocol.PART_HEADER: "what"},
        protocol.part_headers(protocol.ITEM),
        {**protocol.part_headers(protocol.END, -1)},
    ]:
        with pytest.raises(RemoteError, match=r"MalformedReply"):
            protocol.read_part(bad)
    assert protocol.parse_part("item", protocol.item_body([1])) == [1]
    with pytest.raises(RemoteError):
        protocol.parse_part("item", {"result": 1})


# -- the dispatcher ---------------------------------------------------------------------


class Sink:
    """Collects what a dispatcher sends besides its final replies."""

    def __init__(self) -> None:
        self.parts: list[Reply] = []
        self.keepalives: list[tuple[float, Reply]] = []

    def publish_part(self, reply: Reply) -> None:
        self.parts.append(reply)

    @contextmanager
    def keep_alive(self, interval: float, make: Callable[[], Reply]) -> Iterator[None]:
        self.keepalives.append((interval, make()))
        yield

    def bodies(self) -> list[tuple[Any, Any, Any]]:
        return [
            (headers[protocol.PART_HEADER], headers.get(protocol.SEQ_HEADER), json.loads(encoded.payload))
            for _, encoded, headers in self.parts
        ]


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    event_loop = EventLoop()
    yield event_loop
    event_loop.stop()


@pytest.fixture
def registry() -> Registry:
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
        raise ValueError("broke mid-stream")

    @reg.remote
    def stoppable(n: int) -> Iterator[int]:
        for i in range(n):
            call = current_call()
            assert call is not None and call._cancels is not None
            if i == 2:  # as the server's cancel listener does when a cancel comes
                call._cancels.add(call.call_id)
            yield i

    @reg.remote
    def job() -> str:
        call = current_call()
        assert call is not None
        call.progress(0.5)
        call.progress({"done": 1})
        return "ok"

    @reg.remote
    def plain() -> int:
        return 1

    return reg


def dispatcher(registry: Registry, loop: EventLoop) -> tuple[Dispatcher, Sink]:
    dispatch = Dispatcher(registry, Envelope(), "server-1", "q", run_coroutine=loop.run)
    sink = Sink()
    dispatch.parts = sink
    return dispatch, sink


def wanting(method: str, *args: Any, **wants: Any) -> Any:
    return request(method, *args, headers={protocol.WANTS_HEADER: protocol.Wants(**wants).header()})


def final(reply: Reply | None) -> tuple[dict[str, Any], Any]:
    assert reply is not None
    _, encoded, headers = reply
    return headers, json.loads(encoded.payload)


@pytest.mark.parametrize("method", ["count", "acount"])
def test_a_stream_sends_each_item_then_its_end(registry: Registry, loop: EventLoop, method: str) -> None:
    dispatch, sink = dispatcher(registry, loop)
    headers, body = final(dispatch.run(dispatch.prepare(wanting(method, 3, stream=True))))
    assert sink.bodies() == [("item", i, {"item": i}) for i in range(3)]
    assert (headers[protocol.PART_HEADER], headers[protocol.SEQ_HEADER], body) == ("end", 3, {"result": None})


@pytest.mark.parametrize("method", ["count", "acount"])
def test_a_plain_call_of_a_generator_returns_its_items_as_a_list(
    registry: Registry, loop: EventLoop, method: str
) -> None:
    dispatch, sink = dispatcher(registry, loop)
    headers, body = final(dispatch.run(dispatch.prepare(request(method, 4))))
    assert body == {"result": [0, 1, 2, 3]} and protocol.PART_HEADER not in headers and not sink.parts


def test_a_failure_mid_stream_ends_it_with_the_error_after_the_items(
    registry: Registry, loop: EventLoop
) -> None:
    dispatch, sink = dispatcher(registry, loop)
    headers, body = final(dispatch.run(dispatch.prepare(wanting("failing", 2, stream=True))))
    assert [seq for _, seq, _ in sink.bodies()] == [0, 1]
    assert headers[protocol.PART_HEADER] == "end" and headers[protocol.SEQ_HEADER] == 2
    assert body["error"]["type"] == "ValueError"


def test_a_cancelled_stream_stops_between_items(registry: Registry, loop: EventLoop) -> None:
    dispatch, sink = dispatcher(registry, loop)
    # no end either: the caller that cancelled no longer waits
    assert dispatch.run(dispatch.prepare(wanting("stoppable", 100, stream=True))) is None
    assert [seq for _, seq, _ in sink.bodies()] == [0, 1, 2]


def test_progress_is_sent_only_when_asked_for(registry: Registry, loop: EventLoop) -> None:
    dispatch, sink = dispatcher(registry, loop)
    _, body = final(dispatch.run(dispatch.prepare(request("job"))))
    assert body == {"result": "ok"} and not sink.parts
    headers, body = final(dispatch.run(dispatch.prepare(wanting("job", progress=True))))
    assert body == {"result": "ok"} and protocol.PART_HEADER not in headers
    assert sink.bodies() == [
        ("progress", None, {"progress": 0.5}),
        ("progress", None, {"progress": {"done": 1}}),
    ]


def test_keepalives_are_sent_only_when_asked_for(registry: Registry, loop: EventLoop) -> None:
    dispatch, sink = dispatcher(registry, loop)
    dispatch.run(dispatch.prepare(request("plain")))
    assert not sink.keepalives
    dispatch.run(dispatch.prepare(wanting("plain", keepalive=0.5)))
    [(interval, (_, _, headers))] = sink.keepalives
    assert interval == 0.5 and headers[protocol.PART_HEADER] == "keepalive"


def test_streaming_a_function_that_is_no_generator_is_refused(registry: Registry, loop: EventLoop) -> None:
    dispatch, _ = dispatcher(registry, loop)
    with pytest.raises(Refused) as refused:
        dispatch.prepare(wanting("plain", stream=True))
    assert refused.value.disposal is Disposal.SETTLE
    _, body = final(refused.value.reply)
    assert body["error"]["type"] == "NotAStream"


def test_a_malformed_wants_header_is_rejected(registry: Registry, loop: EventLoop) -> None:
    dispatch, _ = dispatcher(registry, loop)
    with pytest.raises(Refused) as refused:
        dispatch.prepare(request("count", 1, headers={protocol.WANTS_HEADER: {"keepalive": -1}}))
    assert refused.value.disposal is Disposal.REJECT


def test_keepalives_go_out_while_a_call_runs_and_never_after() -> None:
    from kombu import Connection

    from kombu_rpc._replies import Keepalives

    sent = threading.Semaphore(0)
    made: list[bool] = []  # each keepalive: made after its call ended?
    ended = threading.Event()

    def make() -> Reply:
        made.append(ended.is_set())
        sent.release()
        return (protocol.ReplyAddress("test.keepalive.nowhere", "c"), protocol.encode({}, "json"), {})

    keepalives = Keepalives(Connection("memory://"))
    try:
        with keepalives.running(0.02, make):
            for _ in range(3):
                assert sent.acquire(timeout=5)
        ended.set()
        with keepalives.running(5.0, make):  # the thread goes on for the next call
            pass
    finally:
        keepalives.close()
    assert len(made) >= 3 and not any(made)
