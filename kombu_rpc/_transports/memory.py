"""An event-driven ``memory://`` transport: consumers sleep until a message is put
(used for ``memory://`` unless :func:`check` finds that kombu changed; see
:mod:`kombu_rpc._transports`).

kombu's virtual transports poll: an idle ``drain_events`` sleeps
``polling_interval`` (1 s by default) between empty reads, so memory:// is either
slow (long interval) or spins a core (short interval). This subclass keeps kombu's
process-wide memory broker state, and wakes waiting consumers when a message is put,
so it is both fast and idle at zero CPU.

The wake-ups are targeted: each connection (transport) has a waker of its own,
registered under the queues its channels consume. A message put on a queue (directly,
through an exchange, or redelivered) wakes only the connections consuming that queue;
for a fanout exchange, those consuming any queue bound to it. Several connections
consuming one queue are all woken, and one of them gets the message.

Messages put through kombu's plain memory transport land in the same queues but
do not wake the waiters; they are picked up within ``polling_interval``.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from queue import Empty
from time import monotonic
from typing import Any
from uuid import uuid4

from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.transport import memory

from . import REPLY_QUEUE_PREFIX

__all__ = ["Channel", "Transport", "check"]


class _Waker:
    """A wake-up token for one connection's ``drain_events``: set by puts, taken by the waiter.

    The token is a plain lock that is released (token set) by :meth:`wake` and
    acquired (token taken) by the waiter. Nothing here blocks a putter, so a signal
    handler may put a message while its own thread waits in :meth:`wait`.
    """

    __slots__ = ("_lock", "queues")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # no token yet
        #: How many consumers of this connection consume each queue.
        self.queues: Counter[str] = Counter()

    def wake(self) -> None:
        """Set the token (it is set at most once: further wakes are absorbed)."""
        lock = self._lock
        if lock.locked():
            try:
                lock.release()
            except RuntimeError:  # another put set it in between
                pass

    def clear(self) -> None:
        """Take the token if set, without waiting."""
        self._lock.acquire(blocking=False)

    def wait(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds (``None``: no limit) for the token, and take it."""
        if timeout is None:
            self._lock.acquire()
        else:
            self._lock.acquire(timeout=min(max(timeout, 0.0), threading.TIMEOUT_MAX))


class _Registry:
    """Which wakers to wake for a put on each queue.

    Readers (puts) take no lock: each queue maps to a tuple that is replaced, never
    changed in place. Writers (consume, cancel, close) hold a re-entrant lock, as a
    signal handler may open and close a connection while its thread is in here.
    Queues nobody consumes are dropped, so the map does not grow with the number of
    connections or reply queues ever used.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.wakers: dict[str, tuple[_Waker, ...]] = {}
        #: Wakers of connections collected unclosed, dropped by the next writer.
        self._abandoned: list[_Waker] = []

    def add(self, queue: str, waker: _Waker) -> None:
        with self._lock:
            self._reap()
            waker.queues[queue] += 1
            if waker.queues[queue] == 1:
                self.wakers[queue] = (*self.wakers.get(queue, ()), waker)

    def discard(self, queue: str, waker: _Waker) -> None:
        with self._lock:
            self._reap()
            count = waker.queues.get(queue, 0)
            if count > 1:
                waker.queues[queue] = count - 1
            elif count == 1:
                del waker.queues[queue]
                self._drop(queue, waker)

    def abandon(self, waker: _Waker) -> None:
        """Forget ``waker`` at the next change (called from a finalizer, which may run
        in any thread at any point, even one in the middle of a change)."""
        if waker.queues:
            self._abandoned.append(waker)

    def _reap(self) -> None:
        while self._abandoned:
            waker = self._abandoned.pop()
            for queue in waker.queues:
                self._drop(queue, waker)
            waker.queues.clear()

    def _drop(self, queue: str, waker: _Waker) -> None:
        rest = tuple(other for other in self.wakers.get(queue, ()) if other is not waker)
        if rest:
            self.wakers[queue] = rest
        else:
            self.wakers.pop(queue, None)

    def wake(self, queue: str) -> None:
        """Wake every connection consuming ``queue``."""
        for waker in self.wakers.get(queue, ()):
            waker.wake()


_registry = _Registry()
#: Names of proxies' reply queues start with this.
_REPLY_PREFIX = REPLY_QUEUE_PREFIX
#: Delivery tags of the messages put through this transport, unique in the process.
_delivery_tags = itertools.count(1)
#: What :meth:`Channel._deliver_first` returns when there was nothing to deliver.
_NOTHING: Any = object()


class Channel(memory.Channel):  # type: ignore[misc]
    """memory:// channel whose puts wake the connections consuming the queue.

    Bodies are stored as they are: kombu's virtual transports encode them in base64
    by default, for brokers that keep text, but these messages never leave the
    process. A message says how its body is encoded (``body_encoding``), so messages
    put through kombu's plain memory transport (base64) are still read, and theirs
    are read by it. ``transport_options={"body_encoding": ...}`` still applies.
    """

    body_encoding = None

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._waker: _Waker = connection._waker
        #: consumer tag -> the queue registered for it.
        self._registered: dict[str, str] = {}

    def _next_delivery_tag(self) -> str:
        """A delivery tag unique in the process: a counter, where kombu makes a uuid4
        per message (a tag only needs to be unique among the messages a channel holds
        unacknowledged, and kombu's uuid tags cannot collide with these)."""
        return str(next(_delivery_tags))

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        q = self.queues.get(queue)
        if q is None:
            if queue.startswith(_REPLY_PREFIX):  # its proxy closed: drop it, as RabbitMQ does
                return
            q = self._queue_for(queue)
        # As Queue.put does on these unbounded queues, without its conditions: nobody
        # waits in Queue.get (kombu's memory transport reads them with block=False).
        with q.mutex:
            q.queue.append(message)
            q.unfinished_tasks += 1
        _registry.wake(queue)

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        q = self.queues.get(queue)
        if q is None:
            q = self._queue_for(queue)
        with q.mutex:  # as Queue.get does, without its condition and method calls
            if q.queue:
                return q.queue.popleft()
        raise Empty()

    def _poll(self, cycle: Any, callback: Callable[[Any, str], Any], timeout: float | None = None) -> Any:
        """Deliver the first message of the consumed queues, starting where the last
        poll left off (as kombu's ``FairCycle`` does), without an exception per empty
        queue; raises ``Empty`` if there was none."""
        result = self._deliver_first(cycle, callback)
        if result is _NOTHING:
            raise Empty()
        return result

    def _deliver_first(self, cycle: Any, callback: Callable[[Any, str], Any]) -> Any:
        """:meth:`_poll`, returning ``_NOTHING`` instead of raising ``Empty`` (which
        costs as much as the rest of a poll, and every wait starts with one)."""
        queues = self._active_queues
        count = len(queues)
        pos = cycle.pos
        all_queues = self.queues
        for i in range(count):
            index = (pos + i) % count
            name = queues[index]
            q = all_queues.get(name)
            if q is None or not q.queue:
                continue
            with q.mutex:  # as Queue.get does, so plain kombu consumers of the queue stay safe
                if not q.queue:  # another consumer took it
                    continue
                message = q.queue.popleft()
            cycle.pos = index + 1
            return callback(message, name)
        return _NOTHING

    def _put_fanout(self, exchange: str, message: Any, routing_key: str | None = None, **kwargs: Any) -> None:
        for queue in self._lookup(exchange, routing_key):
            self._put(queue, message, **kwargs)

    def basic_consume(self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any) -> Any:
        """Consume ``queue``, and have puts on it wake this channel's connection."""
        self._unregister(consumer_tag)  # a tag consumed again moves to the new queue
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        _registry.add(queue, self._waker)
        self._registered[consumer_tag] = queue
        return result

    def basic_cancel(self, consumer_tag: str) -> Any:
        """Cancel the consumer; puts on its queue no longer wake this connection for it."""
        try:
            return super().basic_cancel(consumer_tag)
        finally:
            self._unregister(consumer_tag)

    def _unregister(self, consumer_tag: str) -> None:
        queue = self._registered.pop(consumer_tag, None)
        if queue is not None:
            _registry.discard(queue, self._waker)

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> None:
        """Delete the queue, bound or not (kombu's only drops queues with bindings), and
        its bindings: unbound from their exchanges' tables too (kombu leaves it there,
        so a fanout would make it again), and an auto-delete exchange it was the last
        queue bound to goes with it, as on RabbitMQ."""
        if if_empty and self._size(queue):
            return
        exchanges = {binding.exchange for binding in self.state.queue_bindings(queue)}
        super().queue_delete(queue, if_unused=if_unused, if_empty=if_empty, **kwargs)
        self._delete(queue)
        for name in exchanges:
            exchange = self.state.exchanges.get(name)
            if exchange is None:
                continue
            table = exchange.get("table", [])
            table[:] = [binding for binding in table if binding[2] != queue]
            if not table and exchange.get("auto_delete"):
                del self.state.exchanges[name]


class Transport(memory.Transport):  # type: ignore[misc]
    """memory:// transport whose ``drain_events`` blocks instead of polling."""

    Channel = Channel

    def __init__(self, client: Any, **kwargs: Any) -> None:
        self._waker = _Waker()
        self._interrupted = False
        super().__init__(client, **kwargs)
        # Consumers are unregistered when cancelled (closing a channel or the
        # connection cancels them); this also covers a connection dropped unclosed.
        weakref.finalize(self, _registry.abandon, self._waker).atexit = False

    @property
    def default_connection_params(self) -> dict[str, Any]:
        """No host to default to (kombu warns when it falls back to 'localhost')."""
        return {}

    def wake(self) -> None:
        """Make ``drain_events`` on this connection return now (raising ``TimeoutError``
        unless a message came), or the next one, if none is running."""
        self._interrupted = True
        self._waker.wake()

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        """Deliver one message, waiting up to ``timeout`` seconds for one to be put.

        Raises:
            TimeoutError: No message within ``timeout`` (``socket.timeout`` is an alias).
        """
        waker = self._waker
        deadline = None
        while True:
            waker.clear()  # a put from here on sets the token again
            if self._deliver_next():
                return
            if self._interrupted:
                self._interrupted = False
                raise TimeoutError()
            wait = self.polling_interval
            if timeout is not None:
                now = monotonic()
                if deadline is None:
                    deadline = now + timeout
                remaining = deadline - now
                if remaining <= 0:
                    raise TimeoutError()
                wait = remaining if wait is None else min(wait, remaining)
            waker.wait(wait)

    def _deliver_next(self) -> bool:
        """Deliver one message, if there is one, from the channels that may consume
        now (with consumers, under their prefetch limit), taking the channels in turn
        as kombu's ``FairCycle`` over them does; False if there was none."""
        channels = self.channels
        count = len(channels)
        cycle = self.cycle
        pos = cycle.pos
        for i in range(count):
            index = (pos + i) % count
            channel = channels[index]
            if (
                channel._consumers
                and channel.qos.can_consume()
                and channel._deliver_first(channel.cycle, self._deliver) is not _NOTHING
            ):
                cycle.pos = index + 1
                return True
        return False


#: kombu's names this module overrides or calls, by owner.
_RELIED_ON = {
    memory.Channel: (
        "_put",
        "_get",
        "_poll",
        "_put_fanout",
        "_lookup",
        "_next_delivery_tag",
        "_queue_for",
        "_delete",
        "_size",
        "basic_consume",
        "basic_cancel",
        "queue_delete",
    ),
    memory.Transport: ("_deliver", "drain_events"),
}


def check() -> str | None:
    """``None`` if the kombu internals this module relies on are there and a message
    put through a fanout exchange reaches its consumer; else what is wrong."""
    missing = [
        f"kombu.transport.memory.{owner.__name__}.{name}"
        for owner, names in _RELIED_ON.items()
        for name in names
        if not callable(getattr(owner, name, None))
    ]
    if not isinstance(getattr(memory.Channel, "queues", None), dict):
        missing.append("kombu.transport.memory.Channel.queues")
    if missing:
        return f"missing {', '.join(missing)}"
    name = f"kombu_rpc.check.{uuid4().hex}"
    received: list[Any] = []
    try:
        with Connection(transport=Transport) as conn:
            channel = conn.channel()
            exchange = Exchange(name, "fanout", durable=False)
            queue = Queue(name, exchange, durable=False)(channel)
            queue.declare()
            consumer = Consumer(channel, [queue], on_message=received.append, no_ack=True, accept=["json"])
            consumer.consume()
            Producer(channel).publish({"n": 1}, exchange=exchange, serializer="json")
            conn.drain_events(timeout=1.0)
            consumer.cancel()
            queue.delete()
            exchange(channel).delete()
    except Exception as exc:
        return f"a message through a fanout exchange failed: {type(exc).__name__}: {exc}"
    if [message.decode() for message in received] != [{"n": 1}]:
        return f"a message through a fanout exchange came back as {received!r}"
    return None
