"""The server's worker pool hands finished calls back to the consuming thread, waking
it through a socket pair: once for calls that finish in a row, since the consuming
thread settles every finished call it finds."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from kombu_rpc._execution import WorkerPool
from kombu_rpc._replies import ACK, REQUEUE

pytestmark = pytest.mark.timeout(10)


def wake_ups(pool: WorkerPool) -> bytes:
    """The wake-up bytes waiting for the consuming thread (read without blocking)."""
    assert pool.wake_r is not None
    pool.wake_r.setblocking(False)
    try:
        return pool.wake_r.recv(4096)
    except BlockingIOError:
        return b""


def finished(pool: WorkerPool, count: int) -> None:
    with pool.cond:
        assert pool.cond.wait_for(lambda: len(pool.done) == count, 5), f"{len(pool.done)} finished"


def publish(reply: Any) -> Any:
    raise AssertionError("calls without a reply publish nothing")


def test_calls_finishing_in_a_row_wake_the_consuming_thread_once() -> None:
    release = threading.Event()

    def run(job: Any) -> None:
        assert release.wait(5)

    pool = WorkerPool(4, run, publish, wake_up=True)
    try:
        # Given four calls running at once
        for n in range(4):
            pool.submit(f"request {n}", 0, ())  # type: ignore[arg-type]
        # When they all finish before the consuming thread looks
        release.set()
        finished(pool, 4)
        # Then one byte wakes it, and it finds all four, in order of finishing
        assert wake_ups(pool) == b"\0"
        taken = [pool.take() for _ in range(4)]
        assert sorted(message for message, *_ in taken) == [f"request {n}" for n in range(4)]  # type: ignore[type-var]
        assert all(settlement is ACK for *_, settlement in taken)
        assert pool.in_flight == 0
        # And a call finishing after it took them all wakes it again
        pool.submit("request 4", 0, ())  # type: ignore[arg-type]
        finished(pool, 1)
        assert wake_ups(pool) == b"\0"
        assert pool.take()[0] == "request 4"
        assert wake_ups(pool) == b""
    finally:
        pool.close()


def test_a_call_that_fails_in_the_pool_is_requeued_not_lost(caplog: pytest.LogCaptureFixture) -> None:
    def run(job: Any) -> None:
        raise RuntimeError("a bug below the dispatcher")

    pool = WorkerPool(2, run, publish, wake_up=True)
    try:
        # When running a call raises (the dispatcher turns a function's errors into
        # replies: this is a failure of its own)
        pool.submit("request", 0, ())  # type: ignore[arg-type]
        finished(pool, 1)
        # Then its request goes back to the broker, the pool keeps its slot count right,
        # and the error is logged
        message, _, reply, settlement = pool.take()
        assert (message, reply, settlement) == ("request", None, REQUEUE)
        assert pool.in_flight == 0
        assert "a bug below the dispatcher" in caplog.text
        # And the worker goes on with the next call
        pool.submit("next", 0, ())  # type: ignore[arg-type]
        finished(pool, 1)
        assert pool.take()[0] == "next"
    finally:
        pool.close()
