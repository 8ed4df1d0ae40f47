"""The turn-taking of a proxy's link (``kombu_rpc._links.turns.Turns``), without a
broker: a fake reader stands in for the connection, and delivers only what a test
posts to it."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from time import monotonic

import pytest

from kombu_rpc._links import turns as turns_module
from kombu_rpc._links.turns import Turns

pytestmark = pytest.mark.timeout(30)

#: Longest wait for something a test expects to happen at once.
SOON = 5.0


class FakeReader:
    """A connection stand-in: a read waits (up to its timeout) for something posted, or
    for a wake-up, and runs what was posted in the reading thread."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.inbox: list[Callable[[], None]] = []
        self.woken = False
        self.reads: list[str] = []  # the names of the threads that read, in order
        self.works: list[float] = []  # the timeouts of the link thread's turns
        self.active = 0  # threads inside read() now
        self.most_active = 0
        self.in_flight = 0  # has_work()
        self.awaited_calls = 0  # awaited(): calls a caller will come back for
        self.broken = False  # must_act(): only the link's thread may act
        self.fail_work: Exception | None = None  # raised by the next work()
        self._entered: defaultdict[str, threading.Event] = defaultdict(threading.Event)

    def entered(self, name: str) -> threading.Event:
        """Set once the thread ``name`` has begun a read."""
        with self.cond:
            return self._entered[name]

    def post(self, item: Callable[[], None]) -> None:
        """Have the current or next read run ``item``."""
        with self.cond:
            self.inbox.append(item)
            self.cond.notify_all()

    def read(self, timeout: float) -> None:
        name = threading.current_thread().name
        with self.cond:
            self.reads.append(name)
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self._entered[name].set()
            try:
                self.cond.wait_for(lambda: self.inbox or self.woken, timeout)
                items, self.inbox, self.woken = self.inbox, [], False
            finally:
                self.active -= 1
        for item in items:
            item()

    def work(self, timeout: float) -> None:
        self.works.append(timeout)
        if self.fail_work is not None:
            exc, self.fail_work = self.fail_work, None
            raise exc
        if self.broken:
            self.broken = False  # reconnected
        else:
            self.read(timeout)

    def wake(self) -> None:
        with self.cond:
            self.woken = True
            self.cond.notify_all()

    def has_work(self) -> bool:
        return self.in_flight > 0

    def awaited(self) -> bool:
        return self.awaited_calls > 0

    def must_act(self) -> bool:
        return self.broken


class Caller(threading.Thread):
    """A thread waiting in :meth:`Turns.wait` for its call (an event) to end."""

    def __init__(self, turns: Turns, name: str, timeout: float | None = 20.0) -> None:
        super().__init__(name=name, daemon=True)
        self.turns = turns
        self.timeout = timeout
        self.call = threading.Event()  # the call ended
        self.checked = threading.Event()  # the caller looked at its call
        self.returned = threading.Event()
        self.error: BaseException | None = None
        self.waited = 0.0

    def done(self) -> bool:
        self.checked.set()
        return self.call.is_set()

    def run(self) -> None:
        began = monotonic()
        try:
            self.turns.wait(self.done, self.timeout)
        except BaseException as exc:
            self.error = exc
        finally:
            self.waited = monotonic() - began
            self.returned.set()


@pytest.fixture
def reader() -> FakeReader:
    return FakeReader()


@pytest.fixture
def turns(reader: FakeReader) -> Iterator[Turns]:
    turns = Turns(reader)
    yield turns
    turns.stop()
    reader.post(lambda: None)  # ends what a test left reading


def caller(turns: Turns, name: str, timeout: float | None = 20.0) -> Caller:
    thread = Caller(turns, name, timeout)
    thread.start()
    assert thread.checked.wait(SOON)
    return thread


def leader(turns: Turns, reader: FakeReader, name: str) -> Caller:
    """A caller that has begun reading (the leader)."""
    thread = caller(turns, name)
    assert reader.entered(name).wait(SOON)
    return thread


def test_one_caller_reads_while_the_others_follow(turns: Turns, reader: FakeReader) -> None:
    first = leader(turns, reader, "first")
    others = [caller(turns, f"other-{i}") for i in range(4)]
    everyone = [first, *others]

    def all_replies() -> None:
        for thread in everyone:
            thread.call.set()

    reader.post(all_replies)
    for thread in everyone:
        assert thread.returned.wait(SOON) and thread.error is None
    assert reader.most_active == 1
    assert set(reader.reads) == {"first"}  # the followers' calls ended in the leader's read


def test_a_follower_whose_call_ended_returns_without_reading(turns: Turns, reader: FakeReader) -> None:
    first = leader(turns, reader, "first")
    second = caller(turns, "second")
    reader.post(second.call.set)  # the leader reads the follower's reply
    assert second.returned.wait(SOON) and second.error is None
    assert "second" not in reader.reads
    reader.post(first.call.set)
    assert first.returned.wait(SOON)


def test_the_lead_passes_to_a_follower_when_the_leaders_call_ends(turns: Turns, reader: FakeReader) -> None:
    first = leader(turns, reader, "first")
    second = caller(turns, "second")
    reader.post(first.call.set)
    assert first.returned.wait(SOON)
    assert reader.entered("second").wait(SOON)  # the follower reads now
    reader.post(second.call.set)
    assert second.returned.wait(SOON) and second.error is None
    assert reader.reads[0] == "first" and reader.reads[-1] == "second"
    assert reader.most_active == 1


def test_a_wake_up_releases_the_followers(
    turns: Turns, reader: FakeReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(turns_module, "IDLE_WAIT", 60.0)  # no read or wait ends by itself
    first = leader(turns, reader, "first")
    second = caller(turns, "second", timeout=60.0)
    second.call.set()  # ended without a reply (failed by its deadline, or at close)
    turns.wake_waiters()
    assert second.returned.wait(SOON) and second.error is None
    assert "second" not in reader.reads
    reader.post(first.call.set)
    assert first.returned.wait(SOON)


def test_a_callers_timeout_is_honoured_leading_or_following(
    turns: Turns, reader: FakeReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(turns_module, "IDLE_WAIT", 60.0)
    alone = caller(turns, "alone", timeout=0.3)  # leads: its read is bounded by its deadline
    assert alone.returned.wait(SOON) and alone.error is None
    assert 0.3 <= alone.waited < 0.3 + 2
    first = leader(turns, reader, "first")
    follower = caller(turns, "follower", timeout=0.3)
    assert follower.returned.wait(SOON) and follower.error is None
    assert 0.3 <= follower.waited < 0.3 + 2
    assert not first.returned.is_set()
    reader.post(first.call.set)
    assert first.returned.wait(SOON)


def test_an_error_of_a_read_reaches_its_reader_and_the_lead_passes_on(
    turns: Turns, reader: FakeReader
) -> None:
    first = leader(turns, reader, "first")
    second = caller(turns, "second")

    def broken() -> None:
        raise ConnectionError("a read failed")

    reader.post(broken)
    assert first.returned.wait(SOON)
    assert isinstance(first.error, ConnectionError)
    assert reader.entered("second").wait(SOON)  # the follower leads now
    reader.post(second.call.set)
    assert second.returned.wait(SOON) and second.error is None


def test_the_links_thread_reads_for_calls_nobody_waits_on(turns: Turns, reader: FakeReader) -> None:
    turns.start()
    done = threading.Event()
    reader.in_flight = 1
    turns.unattended()
    assert reader.entered("kombu_rpc-link").wait(SOON)
    reader.post(done.set)
    assert done.wait(SOON)
    assert set(reader.reads) == {"kombu_rpc-link"}


def test_the_links_thread_leaves_calls_to_a_caller_who_comes_back_in_time(
    turns: Turns, reader: FakeReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A map's caller yields a result between two waits: the link's thread does not
    take the reading over meanwhile (no thread switch per result), but reads for the
    caller's calls once it stayed away for AWAY_WAIT (their deadlines run on)."""
    monkeypatch.setattr(turns_module, "IDLE_WAIT", 60.0)  # no idle check meanwhile
    monkeypatch.setattr(turns_module, "AWAY_WAIT", 0.3)
    turns.start()
    reader.awaited_calls = 1
    for round_no in range(3):  # the caller comes back within AWAY_WAIT each time
        first = caller(turns, f"first-{round_no}")
        reader.post(first.call.set)
        assert first.returned.wait(SOON) and first.error is None
    assert "kombu_rpc-link" not in reader.reads
    left = monotonic()
    # Then the caller stays away: the link's thread reads for its calls
    assert reader.entered("kombu_rpc-link").wait(SOON)
    assert monotonic() - left >= 0.3 - 0.05  # not before AWAY_WAIT (the clock's grain)
    done = threading.Event()
    reader.post(done.set)
    assert done.wait(SOON)


def test_the_links_thread_acts_alone_then_callers_read_again(turns: Turns, reader: FakeReader) -> None:
    reader.broken = True  # a lost connection: only the link's thread may act
    first = caller(turns, "first")
    turns.start()
    turns.notify_thread()
    assert reader.entered("first").wait(SOON)  # once the thread reconnected
    assert reader.works and set(reader.reads) == {"first"}
    reader.post(first.call.set)
    assert first.returned.wait(SOON) and first.error is None


def test_where_callers_do_not_read_the_links_thread_reads_for_them(reader: FakeReader) -> None:
    turns = Turns(reader, callers_read=False)
    turns.start()
    try:
        first = caller(turns, "first")
        assert reader.entered("kombu_rpc-link").wait(SOON)
        reader.post(first.call.set)
        assert first.returned.wait(SOON) and first.error is None
        assert set(reader.reads) == {"kombu_rpc-link"}
    finally:
        assert turns.stop()


def test_the_links_thread_survives_an_error(
    turns: Turns, reader: FakeReader, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(turns_module, "IDLE_WAIT", 0.05)  # the pause after a failure
    reader.fail_work = RuntimeError("a bug")
    reader.in_flight = 1
    done = threading.Event()
    with caplog.at_level(logging.ERROR, logger="kombu_rpc.link"):
        turns.start()
        turns.unattended()
        assert reader.entered("kombu_rpc-link").wait(SOON)  # after the failed turn
        reader.post(done.set)
        assert done.wait(SOON)
    assert any("the link's thread failed" in r.getMessage() for r in caplog.records)


def test_stop_wakes_the_reader_and_ends_the_thread(
    turns: Turns, reader: FakeReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(turns_module, "IDLE_WAIT", 60.0)  # no read or wait ends by itself
    turns.start()
    first = leader(turns, reader, "first")
    second = caller(turns, "second", timeout=60.0)
    began = monotonic()
    assert turns.stop()  # wakes the leader's read, ends the link's thread
    assert monotonic() - began < SOON
    # the client then fails the calls and wakes the waiters: they return at once
    first.call.set()
    second.call.set()
    turns.wake_waiters()
    for thread in (first, second):
        assert thread.returned.wait(SOON) and thread.error is None
    # nobody reads once stopped
    reads = len(reader.reads)
    turns.wait(lambda: False, 0.1)
    assert len(reader.reads) == reads
