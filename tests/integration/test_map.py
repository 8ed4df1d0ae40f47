"""``proxy.f.map(...)``: many calls in flight from one thread, results in order; on
memory:// and every real broker."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kombu_rpc import (
    CallError,
    ConfigurationError,
    Registry,
    RemoteError,
    RPCProxy,
    RPCServer,
    SerializationError,
)
from kombu_rpc._pending import _Pending

from ..conftest import Gate, Recorder

pytestmark = pytest.mark.timeout(60)


def test_map_yields_every_result_in_order(serve: Callable[..., RPCServer], proxy: RPCProxy) -> None:
    serve(concurrency=4)  # results finish out of order; they come back in order
    assert list(proxy.fib.map(range(40), window=8)) == [fib(n) for n in range(40)]
    assert list(proxy.math.add.map(["a", "b", "c"], "xy")) == ["ax", "by"]  # to the shortest
    assert list(proxy.fib.map([])) == []


def test_map_keeps_at_most_window_calls_in_flight(
    serve: Callable[..., RPCServer], proxy: RPCProxy, gate: Gate, recorder: Recorder
) -> None:
    serve(concurrency=4)
    results: list[Any] = []
    mapping = threading.Thread(target=lambda: results.extend(proxy.held.map(range(5), window=2)))
    mapping.start()
    try:
        gate.wait_entered(2)
        # a server with room for four runs only the two calls the window lets out
        assert not gate.entered.acquire(timeout=0.5), "a third call was sent with a window of 2"
    finally:
        gate.released.set()
    mapping.join(20)
    assert not mapping.is_alive()
    assert results == [0, 1, 2, 3, 4]
    assert sorted(recorder.calls) == [0, 1, 2, 3, 4]


def test_the_first_failure_is_raised_after_the_results_before_it(
    serve: Callable[..., RPCServer], proxy: RPCProxy
) -> None:
    serve()
    results = proxy.math.add.map([1, 2, "x", 4], [1, 1, 1, 1])
    assert next(results) == 2
    assert next(results) == 3
    with pytest.raises(RemoteError) as info:
        next(results)
    assert info.value.exc_type == "TypeError"
    with pytest.raises(StopIteration):  # the map ended with its failure
        next(results)


def test_arguments_that_cannot_be_sent_end_the_map_in_their_turn(
    serve: Callable[..., RPCServer], proxy: RPCProxy, recorder: Recorder
) -> None:
    serve()
    results = proxy.record.map([1, object(), 3])
    assert next(results) is None
    with pytest.raises(SerializationError):
        next(results)
    proxy.record(4)  # a single server runs requests in order: 3 would have come first
    assert recorder.calls == [1, 4]


@pytest.fixture
def first_quick(gate: Gate) -> Registry:
    """``first_quick(n)``: returns 0 at once, any other ``n`` once the gate opens."""
    reg = Registry()

    @reg.remote
    def first_quick(n: int) -> int:
        if n:
            gate.entered.release()
            assert gate.released.wait(20), "test never released the gate"
        return n

    return reg


@pytest.mark.parametrize("how", ["close", "break"])
def test_stopping_early_cancels_the_calls_in_flight(
    serve: Callable[..., RPCServer],
    proxy: RPCProxy,
    gate: Gate,
    first_quick: Registry,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    serve(registry=first_quick, concurrency=4)
    pending = proxy._client._pending
    with caplog.at_level(logging.WARNING, logger="kombu_rpc"):
        if how == "close":
            results = proxy.first_quick.map(range(4), window=4)
            assert next(results) == 0
            gate.wait_entered(3)
            assert len(pending) == 3  # the other three run
            results.close()
        else:
            for n in proxy.first_quick.map(range(4), window=4):
                assert n == 0
                gate.wait_entered(3)
                assert len(pending) == 3
                break  # the loop held the only reference to the generator: it is closed
        assert len(pending) == 0  # ended here at once
        gate.released.set()
        assert proxy.first_quick(0) == 0  # their replies, if any come, are dropped quietly
    assert not [r for r in caplog.records if "dropped" in r.getMessage()]


def test_closing_the_proxy_ends_a_map(
    serve: Callable[..., RPCServer], proxy: RPCProxy, gate: Gate, first_quick: Registry
) -> None:
    serve(registry=first_quick, concurrency=4)
    results = proxy.first_quick.map(range(3))
    assert next(results) == 0
    gate.wait_entered(2)
    proxy.close()
    with pytest.raises(CallError, match="proxy closed"):
        next(results)


def test_an_error_of_the_iterable_comes_in_its_turn(serve: Callable[..., RPCServer], proxy: RPCProxy) -> None:
    def arguments() -> Iterator[int]:
        yield 10
        yield 20
        raise ValueError("no more arguments")

    serve()
    results = proxy.fib.map(arguments())
    assert next(results) == 55
    assert next(results) == 6765
    with pytest.raises(ValueError, match="no more arguments"):
        next(results)


def test_the_calls_of_a_caller_away_between_two_results_are_read_meanwhile(
    serve: Callable[..., RPCServer], proxies: Callable[..., RPCProxy]
) -> None:
    """Their deadlines run on while the caller is away: the link's thread reads their
    replies once it stayed away a moment, so none of them times out unread."""
    serve(concurrency=4)
    proxy = proxies(timeout=1.5)
    results = proxy.fib.map(range(30), window=30)
    assert next(results) == 0
    time.sleep(2.0)  # the caller busy elsewhere for longer than the calls' timeout
    assert list(results) == [fib(n) for n in range(1, 30)]


def test_map_checks_its_arguments_before_iterating(proxy: RPCProxy) -> None:
    for window in (0, -1, True, 2.0, None):
        with pytest.raises(ConfigurationError, match="window must be a positive integer"):
            proxy.fib.map(range(3), window=window)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="at least one iterable"):
        proxy.fib.map()
    with pytest.raises(ConfigurationError, match="invalid remote name"):
        proxy["_private"].map(range(3))


def test_the_calling_thread_reads_the_replies_of_its_map(
    serve: Callable[..., RPCServer], proxy: RPCProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No thread hop per reply: the thread iterating reads the replies itself, as a
    blocking call's caller does."""
    serve()
    assert proxy.fib(1) == 1  # the link is up
    readers: list[str] = []
    resolve = _Pending.resolve

    def spy(pending: _Pending, result: Any) -> None:
        readers.append(threading.current_thread().name)
        resolve(pending, result)

    monkeypatch.setattr(_Pending, "resolve", spy)
    assert list(proxy.fib.map(range(200), window=16)) == [fib(n) for n in range(200)]
    mine = readers.count(threading.current_thread().name)
    # the link's thread may take what it finds on its once-a-second idle check
    assert mine >= 180, f"{mine} of {len(readers)} replies read by the calling thread: {set(readers)}"


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
