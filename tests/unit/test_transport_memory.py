"""kombu_rpc's event-driven memory:// transport: targeted wake-ups, fanout, timeouts,
consumers sharing a queue, cancelled and closed consumers, and no leaked registrations.

Consumers poll only every ``POLL`` seconds, so a missed wake-up shows as a thread
still blocked at ``DEADLINE`` (well under ``POLL``), not as a slow test.
"""

from __future__ import annotations

import gc
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from time import monotonic
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from kombu_rpc._transports import memory
from kombu_rpc.testing import unique_queue_name

#: Seconds between a consumer's polls: far longer than any test waits for a wake-up.
POLL = 30.0
#: Longest wait for something that should happen at once.
DEADLINE = 10.0

pytestmark = pytest.mark.timeout(25)

Open = Callable[..., Connection]


@pytest.fixture
def open_connection() -> Iterator[Open]:
    """Open connections on kombu_rpc's memory transport; all released afterwards."""
    conns: list[Connection] = []

    def open_(polling_interval: float = POLL) -> Connection:
        conn = Connection(
            transport=memory.Transport, transport_options={"polling_interval": polling_interval}
        )
        conn.connect()
        conns.append(conn)
        return conn

    yield open_
    for conn in conns:
        conn.release()


@pytest.fixture
def queue_names() -> Iterator[Callable[[], str]]:
    """Unique queue names, deleted from the process-wide memory broker afterwards."""
    names: list[str] = []

    def new() -> str:
        names.append(unique_queue_name("memory-transport"))
        return names[-1]

    yield new
    with Connection(transport=memory.Transport) as conn:
        for name in names:
            conn.default_channel.queue_delete(name)


def consume(conn: Connection, name: str, exchange: Exchange | None = None) -> tuple[list[Any], Consumer]:
    """Consume queue ``name`` (declared, bound to ``exchange`` if given) on a new channel
    of ``conn``; returns the list the bodies received are appended to, and the consumer."""
    received: list[Any] = []
    channel = conn.channel()
    queue = Queue(name, exchange=exchange, routing_key=name if exchange is None else "", channel=channel)
    queue.declare()
    consumer = Consumer(
        channel, [queue], callbacks=[lambda body, message: received.append(body)], no_ack=True
    )
    consumer.consume()
    return received, consumer


def publish(conn: Connection, body: Any, routing_key: str = "", exchange: Exchange | str = "") -> None:
    Producer(conn.default_channel).publish(
        body, routing_key=routing_key, exchange=exchange, serializer="json"
    )


class Drainer(threading.Thread):
    """``conn.drain_events(timeout)`` in a thread of its own, keeping any exception."""

    def __init__(self, conn: Connection, timeout: float | None = None) -> None:
        super().__init__(daemon=True)
        self.conn = conn
        self.timeout = timeout
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.conn.drain_events(timeout=self.timeout)
        except BaseException as exc:
            self.error = exc

    def finished(self) -> None:
        self.join(DEADLINE)
        assert not self.is_alive(), "drain_events was not woken"
        assert self.error is None


@pytest.fixture
def waiting(monkeypatch: pytest.MonkeyPatch) -> Callable[[Connection], None]:
    """A function that returns once ``conn``'s ``drain_events`` found nothing and waits."""
    entered: set[int] = set()
    cond = threading.Condition()
    original = memory._Waker.wait

    def wait(self: memory._Waker, timeout: float | None) -> None:
        with cond:
            entered.add(id(self))
            cond.notify_all()
        original(self, timeout)

    monkeypatch.setattr(memory._Waker, "wait", wait)

    def until_waiting(conn: Connection) -> None:
        waker = conn.transport._waker
        with cond:
            assert cond.wait_for(lambda: id(waker) in entered, DEADLINE), "drain_events never waited"

    return until_waiting


@pytest.fixture
def woken(monkeypatch: pytest.MonkeyPatch) -> list[memory._Waker]:
    """The wakers woken by puts, in order."""
    out: list[memory._Waker] = []
    original = memory._Waker.wake

    def wake(self: memory._Waker) -> None:
        out.append(self)
        original(self)

    monkeypatch.setattr(memory._Waker, "wake", wake)
    return out


def registered(queue: str) -> list[memory._Waker]:
    return list(memory._registry.wakers.get(queue, ()))


def test_a_put_wakes_a_blocked_drain_on_that_queue(
    open_connection: Open, queue_names: Callable[[], str], waiting: Callable[[Connection], None]
) -> None:
    conn = open_connection()
    name = queue_names()
    received, _ = consume(conn, name)
    drainer = Drainer(conn)
    drainer.start()
    waiting(conn)
    publish(open_connection(), {"n": 1}, routing_key=name)
    drainer.finished()
    assert received == [{"n": 1}]


def test_a_put_wakes_only_the_connections_consuming_its_queue(
    open_connection: Open, queue_names: Callable[[], str], woken: list[memory._Waker]
) -> None:
    mine, other = open_connection(), open_connection()
    mine_name, other_name = queue_names(), queue_names()
    mine_received, _ = consume(mine, mine_name)
    other_received, _ = consume(other, other_name)
    publish(open_connection(), "for other", routing_key=other_name)
    assert woken == [other.transport._waker]
    with pytest.raises(TimeoutError):
        mine.drain_events(timeout=0.05)
    other.drain_events(timeout=DEADLINE)
    assert mine_received == [] and other_received == ["for other"]


def test_fanout_reaches_each_bound_consumer(
    open_connection: Open,
    queue_names: Callable[[], str],
    waiting: Callable[[Connection], None],
    woken: list[memory._Waker],
) -> None:
    exchange = Exchange(unique_queue_name("memory-fanout"), type="fanout", auto_delete=True)
    conns = [open_connection() for _ in range(3)]
    bystander = open_connection()
    consume(bystander, queue_names())
    inboxes = [consume(conn, queue_names(), exchange)[0] for conn in conns]
    drainers = [Drainer(conn) for conn in conns]
    for drainer, conn in zip(drainers, conns, strict=True):
        drainer.start()
        waiting(conn)
    publish(open_connection(), "to all", exchange=exchange)
    for drainer in drainers:
        drainer.finished()
    assert inboxes == [["to all"]] * 3
    assert sorted(map(id, woken)) == sorted(id(conn.transport._waker) for conn in conns)
    open_connection().default_channel.exchange_delete(exchange.name)


def test_consumers_of_one_queue_get_each_message_once(
    open_connection: Open, queue_names: Callable[[], str], woken: list[memory._Waker]
) -> None:
    name = queue_names()
    first, second = open_connection(), open_connection()
    first_received, _ = consume(first, name)
    second_received, _ = consume(second, name)
    producer = open_connection()
    for n in range(20):
        publish(producer, n, routing_key=name)
    assert {id(waker) for waker in woken} == {id(first.transport._waker), id(second.transport._waker)}
    for conn in [first, second] * 10:
        conn.drain_events(timeout=0)
    for conn in (first, second):
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0)
    assert sorted(first_received + second_received) == list(range(20))


def test_drain_events_delivers_one_message_per_call(
    open_connection: Open, queue_names: Callable[[], str]
) -> None:
    conn = open_connection()
    name = queue_names()
    received, _ = consume(conn, name)
    for n in range(3):
        publish(conn, n, routing_key=name)
    conn.drain_events(timeout=0)
    assert received == [0]
    conn.drain_events(timeout=0)
    conn.drain_events(timeout=0)
    assert received == [0, 1, 2]


def test_an_idle_drain_times_out_without_polling_in_between(
    open_connection: Open, queue_names: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = open_connection()
    consume(conn, queue_names())
    polls = []
    original = memory.Transport._deliver_next

    def deliver_next(self: memory.Transport) -> bool:
        polls.append(monotonic())
        return original(self)

    monkeypatch.setattr(memory.Transport, "_deliver_next", deliver_next)
    started = monotonic()
    with pytest.raises(TimeoutError):
        conn.drain_events(timeout=0.2)
    assert monotonic() - started >= 0.2
    # One look, one wait to the deadline, one last look; a wait that ends a little
    # early may add a look or two, but nothing like a loop.
    assert len(polls) < 5
    with pytest.raises(TimeoutError):
        conn.drain_events(timeout=0)


def test_a_cancelled_consumer_is_no_longer_woken(
    open_connection: Open, queue_names: Callable[[], str], woken: list[memory._Waker]
) -> None:
    conn = open_connection()
    name = queue_names()
    _, consumer = consume(conn, name)
    assert registered(name) == [conn.transport._waker]
    consumer.cancel()
    assert registered(name) == []
    publish(open_connection(), "nobody", routing_key=name)
    assert woken == []


def test_one_connection_consuming_a_queue_twice_stays_registered_until_both_cancel(
    open_connection: Open, queue_names: Callable[[], str]
) -> None:
    conn = open_connection()
    name = queue_names()
    _, first = consume(conn, name)
    _, second = consume(conn, name)
    assert registered(name) == [conn.transport._waker]
    first.cancel()
    assert registered(name) == [conn.transport._waker]
    second.cancel()
    assert registered(name) == []


def test_a_deleted_and_redeclared_queue_still_wakes_its_consumer(
    open_connection: Open, queue_names: Callable[[], str], waiting: Callable[[Connection], None]
) -> None:
    conn = open_connection()
    name = queue_names()
    received, _ = consume(conn, name)
    other = open_connection()
    other.default_channel.queue_delete(name)
    assert name not in memory.Channel.queues
    with pytest.raises(TimeoutError):
        conn.drain_events(timeout=0.05)  # a consumed queue that is gone is no error
    drainer = Drainer(conn)
    drainer.start()
    waiting(conn)
    Queue(name, channel=other.default_channel).declare()
    publish(other, "again", routing_key=name)
    drainer.finished()
    assert received == ["again"]


def test_closed_connections_leave_no_registrations(
    open_connection: Open, queue_names: Callable[[], str]
) -> None:
    before = dict(memory._registry.wakers)
    for _ in range(200):
        conn = Connection(transport=memory.Transport)
        consume(conn, queue_names())
        conn.release()
    assert memory._registry.wakers == before


def test_a_connection_dropped_unclosed_is_unregistered_once_collected(
    open_connection: Open, queue_names: Callable[[], str]
) -> None:
    name = queue_names()
    conn = Connection(transport=memory.Transport)
    consume(conn, name)
    assert len(registered(name)) == 1
    del conn
    gc.collect()
    consume(open_connection(), queue_names())  # the next change drops what was collected
    assert registered(name) == []


def test_a_plain_kombu_put_is_picked_up_within_the_polling_interval(
    open_connection: Open, queue_names: Callable[[], str]
) -> None:
    conn = open_connection(polling_interval=0.05)
    name = queue_names()
    received, _ = consume(conn, name)
    with Connection("memory://localhost") as plain:
        assert not isinstance(plain.transport, memory.Transport)
        publish(plain, "plain", routing_key=name)
    conn.drain_events(timeout=DEADLINE)
    assert received == ["plain"]


def test_bodies_are_stored_as_they_are_and_plain_kombu_reads_them(
    open_connection: Open, queue_names: Callable[[], str]
) -> None:
    name = queue_names()
    conn = open_connection()
    Queue(name, channel=conn.channel()).declare()
    body = b"\x00\xffnot text"
    Producer(conn.channel()).publish(body, routing_key=name, content_type="application/data")
    (raw,) = memory.Channel.queues[name].queue
    assert raw["body"] == body
    assert raw["properties"]["body_encoding"] is None
    with Connection("memory://localhost") as plain:
        assert not isinstance(plain.transport, memory.Transport)
        message = plain.default_channel.basic_get(name, no_ack=True)
    assert message is not None and message.body == body


def test_the_body_encoding_transport_option_still_applies(
    open_connection: Open, queue_names: Callable[[], str]
) -> None:
    name = queue_names()
    conn = open_connection()
    received, _ = consume(conn, name)
    with Connection(transport=memory.Transport, transport_options={"body_encoding": "base64"}) as base64:
        publish(base64, "text", routing_key=name)
    (raw,) = memory.Channel.queues[name].queue
    assert raw["properties"]["body_encoding"] == "base64"
    conn.drain_events(timeout=DEADLINE)
    assert received == ["text"]


def test_delivery_tags_are_unique_and_settle_their_own_message(
    open_connection: Open, queue_names: Callable[[], str]
) -> None:
    name = queue_names()
    conn = open_connection()
    channel = conn.channel()
    Queue(name, channel=channel).declare()
    received: list[Any] = []
    Consumer(channel, [Queue(name)], on_message=received.append).consume()
    for n in range(3):
        publish(open_connection(), n, routing_key=name)
    for _ in range(3):
        conn.drain_events(timeout=DEADLINE)
    assert len({message.delivery_tag for message in received}) == 3
    received[1].requeue()
    received[2].ack()
    received[0].ack()
    conn.drain_events(timeout=DEADLINE)
    assert received[3].decode() == 1 and received[3].delivery_tag == received[1].delivery_tag
    received[3].ack()


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_a_signal_handler_may_put_while_its_own_thread_waits(
    open_connection: Open, queue_names: Callable[[], str], waiting: Callable[[Connection], None]
) -> None:
    assert threading.current_thread() is threading.main_thread()
    conn = open_connection()
    name = queue_names()
    received, _ = consume(conn, name)
    producer = open_connection()

    def handler(signum: int, frame: object) -> None:
        publish(producer, "from the handler", routing_key=name)

    def interrupt() -> None:
        waiting(conn)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        threading.Thread(target=interrupt, daemon=True).start()
        conn.drain_events(timeout=DEADLINE)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == ["from the handler"]


def test_round_trips_between_two_connections_never_miss_a_wake_up(
    open_connection: Open, queue_names: Callable[[], str]
) -> None:
    hops = 4000
    names = queue_names(), queue_names()
    conns = open_connection(), open_connection()
    counts = [0, 0]

    def play(me: int) -> None:
        conn = conns[me]
        producer = Producer(conn.channel())

        def on_message(body: int, message: Any) -> None:
            counts[me] += 1
            producer.publish(body + 1, routing_key=names[1 - me], serializer="json")

        channel = conn.channel()
        queue = Queue(names[me], channel=channel)
        queue.declare()
        Consumer(channel, [queue], callbacks=[on_message], no_ack=True).consume()
        started.wait()
        while counts[me] < hops // 2:
            conn.drain_events(timeout=DEADLINE)

    started = threading.Barrier(3)
    players = [threading.Thread(target=play, args=(me,), daemon=True) for me in (0, 1)]
    for player in players:
        player.start()
    started.wait(DEADLINE)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, also between looking and waiting
    try:
        publish(open_connection(), 0, routing_key=names[0])
        for player in players:
            player.join(DEADLINE)
            assert not player.is_alive(), "a round trip waited for the polling interval"
    finally:
        sys.setswitchinterval(interval)
    assert counts == [hops // 2, hops // 2]
