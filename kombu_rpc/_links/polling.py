"""The links of the transports that poll (every kombu transport but RabbitMQ and
memory://), and of Redis.

On these transports a publish waits for the broker's answer, which a stalled
connection can hold back until the socket timeout: a publisher thread with a
connection of its own publishes the requests that callers queue for it, in order, so
that no broker I/O ever holds a caller past its deadline.

* ``PollingLink`` reads with kombu's ``drain_events``, in slices no longer than the
  transport's polling interval, in its thread only. Any error of the transport counts
  as a lost connection, after which its thread reconnects.
* ``RedisLink`` is a ``PollingLink`` whose reads are a BRPOP on the reply queue, made
  by the waiting callers in turns: a wake-up message ends one early, and its
  connection's socket operations are bounded by ``FRAME_WAIT``. It also takes back
  the requests of calls that ended unanswered.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from queue import SimpleQueue
from time import monotonic
from typing import Any

from kombu import Connection, Consumer, Producer

from .._pending import _Outgoing
from .._transports import REPLY_QUEUE_PREFIX, Lease, close_channel, lease
from ..connection import PUBLISH_TIMEOUT, broker_errors, publishing_clone, reconnect
from ..metrics import count_event
from ..protocol import wake_up_message
from ..topology import discard_queue
from .base import FRAME_WAIT, Link, consume_replies, send
from .turns import Closed

logger = logging.getLogger("kombu_rpc.link")  # the name the guide documents

#: A Redis read this short is made whole (see ``RedisLink._drain_timeout``).
SHORT_READ = 0.02

#: How many of the newest messages of a Redis request queue are searched for an
#: unanswered request to take back (see ``_Withdrawal``).
WITHDRAW_SCAN = 1000
#: Remove the first of the ARGV[2] newest messages of list KEYS[1] that holds the text
#: ARGV[1] (a correlation id), inside Redis: no message crosses the network.
_WITHDRAW_SCRIPT = """
for _, item in ipairs(redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)) do
    if string.find(item, ARGV[1], 1, true) then
        return redis.call('LREM', KEYS[1], 1, item)
    end
end
return 0
"""


@dataclass(frozen=True)
class _Withdrawal:
    """Take back, on Redis, the request of a call that ended unanswered (at its
    deadline, or at close) if it still waits in its queue: kombu's Redis transport
    has no per-message expiry, so it would otherwise stay there until a server comes
    (which drops it as expired), or forever."""

    queue: str
    correlation_id: str

    def run(self, channel: Any) -> None:
        """Remove the request from the first :data:`WITHDRAW_SCAN` messages of its
        queue (kombu's Redis list, newest first), if it is there (best effort)."""
        try:
            if channel.client.eval(_WITHDRAW_SCRIPT, 1, self.queue, self.correlation_id, WITHDRAW_SCAN):
                logger.debug("took back the unanswered request %s from %r", self.correlation_id, self.queue)
        except Exception as exc:  # the request expires at the server anyway
            logger.debug("could not take back the request %s: %s", self.correlation_id, exc)


class PollingLink(Link):
    """Reads the reply queue on any kombu transport that polls; its publisher thread
    sends the requests.

    Takes the arguments of :class:`~kombu_rpc._links.base.Link`. Only the link's
    thread reads, for at most the transport's polling interval at a time, while calls
    are in flight; callers wait for their results. A poll is a query to the
    transport's store (a database, a folder) that nothing bounds in time, so a caller
    who polled could be held past its deadline (by a locked SQLite file, a stalled
    database connection).

    Any exception from the transport counts as a lost connection (kombu's virtual
    transports raise their clients' own errors, such as a database driver's): the
    link's thread then reconnects and consumes the reply queue again; the queue
    outlives the connection, so replies sent meanwhile still arrive.
    """

    callers_read = False
    #: On Redis, the lease on the reply queue (renewed by whoever reads).
    _lease: Lease | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._outbox: SimpleQueue[_Outgoing | _Withdrawal | None] = SimpleQueue()
        self._publisher: threading.Thread | None = None

    def start(self) -> None:
        """Connect, declare and consume the reply queue, and start the link's thread
        and the publisher thread.

        Raises:
            Exception: What connecting raised (the connection errors of kombu's
                transport), after the retry policy's attempts.
        """
        try:
            self._conn.ensure_connection(**self._retry_policy)
            self._consume()
        except BaseException:
            self._conn.release()
            raise
        self._turns.start()
        self._publisher = threading.Thread(target=self._publish_loop, name="kombu_rpc-publisher", daemon=True)
        self._publisher.start()

    def _consume(self) -> None:
        channel = self._conn.channel()
        self._consumer = consume_replies(channel, self.reply_queue, self._on_reply, self._accept)

    # -- publishing, and the publisher thread ----------------------------------------------

    def submit(self, job: _Outgoing, attended: bool) -> None:
        """Queue ``job`` for the publisher thread."""
        self._outbox.put(job)
        if not attended:
            self.unattended()

    def wait_sent(self, sent: Future[None], timeout: float) -> None:
        """Wait until the publisher thread sent a request (no reading meanwhile)."""
        sent.result(timeout)

    def _publish_loop(self) -> None:
        """Publish queued requests in order, skipping those whose caller gave up.

        Publishing runs here rather than in the calling thread so that a stalled
        connection, which can block a publish until its socket timeout, never holds a
        caller past its deadline: the caller waits on its future, which the deadline
        thread fails on time.
        """
        producer = Producer(publishing_clone(self._origin, self._confirm), auto_declare=False)
        try:
            while (job := self._outbox.get()) is not None:
                if isinstance(job, _Withdrawal):
                    job.run(producer.channel)
                else:
                    send(producer, job, self._pending, self._retry_policy, self._confirm)
        finally:
            producer.connection.release()

    def _close_publishing(self, unanswered: list[tuple[str, str]]) -> None:
        """Take back the unanswered requests (Redis), then stop the publisher thread."""
        for queue, correlation_id in unanswered:
            self.withdraw(queue, correlation_id)
        publisher = self._publisher
        if publisher is None:
            return
        self._outbox.put(None)
        publisher.join(PUBLISH_TIMEOUT)
        if publisher.is_alive():
            logger.warning("the publisher is stuck on a dead connection; leaving it behind")

    # -- reading ---------------------------------------------------------------------------

    def _close_reading(self) -> None:
        """Stop the link's thread, delete the reply queue and close the connection."""
        if not self._turns.stop():  # it still uses the connection
            return
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                self._before_cancel(consumer)
            except Exception:  # best effort: closing only takes longer
                pass
            try:
                consumer.cancel()
                self._discard(consumer)
            except Exception as exc:  # the connection is gone: nothing left to clean up
                logger.debug("could not delete the reply queue %s: %s", self.reply_queue, exc)
        try:
            self._conn.release()
        except Exception as exc:
            logger.debug("could not close the reply connection: %s", exc)

    def _before_cancel(self, consumer: Consumer) -> None:
        """Hook: what to do before the consumer is cancelled at close."""

    def _discard(self, consumer: Consumer) -> None:
        """Hook: remove the reply queue of the cancelled ``consumer`` at close."""
        for queue in consumer.queues:
            discard_queue(queue)

    def read(self, timeout: float) -> None:
        """Read what arrives within ``timeout`` seconds, or one polling interval."""
        if self._broken is not None:
            return
        try:
            held, consumer = self._lease, self._consumer
            if held is not None and consumer is not None and held.due():
                held.renew(consumer.channel)
            self._conn.drain_events(timeout=self._drain_timeout(timeout))
        except TimeoutError:
            pass
        except self._lost_errors() as exc:
            if self._broken is None and not self._turns.closing:
                logger.warning("the proxy lost its reply connection (%s); reconnecting", exc)
                count_event("reconnects")
            self._broken = exc  # the leader leaves next, waking the link's thread
            # the cut may have lost a server's ack of an answered call, which then runs
            # and replies again: a reply may come as for a call ended unanswered
            self._pending.unanswered(monotonic())

    def _drain_timeout(self, timeout: float) -> float:
        """What to ask of ``drain_events`` for a read of at most ``timeout`` seconds:
        no more than one polling interval."""
        interval = getattr(self._conn.transport, "polling_interval", None)
        return timeout if interval is None else min(timeout, interval)

    def _lost_errors(self) -> tuple[type[BaseException], ...]:
        """The errors of a read that count as a lost connection: any."""
        return (Exception,)

    def work(self, timeout: float) -> None:
        """Reconnect, read for calls nobody waits on, or take late replies."""
        if self._broken is not None:
            self._recover()
        else:
            self.read(timeout)

    def _recover(self) -> None:
        """Drop the broken channel, then reconnect and consume the reply queue again,
        retrying (with backoff) until it works or the link closes."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:  # it is broken; closing is only to free it
            close_channel(consumer.channel, (Exception,))
        interval = 0.1
        while True:
            try:
                reconnect(self._conn, self._retry_policy, self._turns.check_closing)
                self._consume()
                break
            except Closed:
                raise
            except Exception as again:
                logger.warning("the proxy cannot reconnect (%s); retrying in %.1fs", again, interval)
            if self._turns.wait_closing(interval):
                raise Closed()
            interval = min(2 * interval, self._retry_policy["interval_max"])
        self._broken = None
        logger.info("the proxy reconnected")


#: How long after its deadline a reply may still come (a server replies once its function
#: returns, however late), or after close for a call without a deadline: a closed Redis
#: proxy's reply list expires this long after the last deadline of its calls.
LATE_REPLY_WINDOW = 3600.0
#: What a closed Redis proxy leaves in its reply list when replies may still come (no
#: one reads the list any more).
TOMBSTONE = b"kombu_rpc: the proxy of this reply queue closed; the queue expires by itself"


class RedisLink(PollingLink):
    """Reads the reply queue on Redis with a BRPOP (its publisher thread sends the
    requests); waiting callers read it themselves, in turn.

    Takes the arguments of :class:`~kombu_rpc._links.base.Link`. Every socket operation
    of its connection gives up after ``FRAME_WAIT`` at most (or the connection's own,
    shorter ``socket_timeout``), so a caller reading a reply that stalls halfway is not held
    much past its deadline; that counts as a lost connection. A waiting BRPOP is ended
    early by a wake-up message pushed to the reply queue.

    At close, the reply queue is deleted unless replies may still come; a reply would
    then make its list again, for ever. So the list is left to expire by itself instead,
    holding :data:`TOMBSTONE`, :data:`LATE_REPLY_WINDOW` after the last deadline (Redis
    keeps a list's time to live when something is pushed to it). A proxy that never
    closes (killed) leaves its list to servers, which sweep it once the proxy's lease ran
    out (:mod:`kombu_rpc._transports.leases`).
    """

    callers_read = True
    #: Gives up the lease at interpreter exit, unless the proxy gave it up before.
    _at_exit: partial[None]

    def __init__(self, connection: Connection, *args: Any, **kwargs: Any) -> None:
        super().__init__(connection, *args, **kwargs)
        options = dict(self._conn.transport_options)
        limit = options.get("socket_timeout")
        options["socket_timeout"] = FRAME_WAIT if limit is None else min(limit, FRAME_WAIT)
        self._conn = connection.clone(transport_options=options)

    def _consume(self) -> None:
        """Consume the reply queue; the first time, also take a lease on it, given up
        at interpreter exit if the proxy was not closed (a script that never closes its
        proxy would otherwise leave one lease an hour per run)."""
        super()._consume()
        consumer = self._consumer
        if self._lease is None and consumer is not None:
            uid = self.reply_queue.removeprefix(REPLY_QUEUE_PREFIX)
            held = lease(self._conn, consumer.channel, uid, consumer.queues, sweeps=False, role="proxy")
            if held is not None:
                held.renew(consumer.channel)
                self._at_exit = partial(_give_up, self._conn.clone(), held)
                atexit.register(self._at_exit)
            self._lease = held

    def _release(self, channel: Any) -> None:
        """Give up the lease on the reply queue, once the queue was dealt with (if Redis
        cannot be told, at interpreter exit)."""
        held, self._lease = self._lease, None
        if held is not None:
            held.release(channel)
            atexit.unregister(self._at_exit)

    def _before_cancel(self, consumer: Consumer) -> None:
        """A BRPOP still waiting would hold up closing the channel until Redis ends it
        (a second): have it take a wake-up at once."""
        if self._broken is None:
            self._wake_up(consumer.channel)
            try:
                self._conn.drain_events(timeout=FRAME_WAIT)
            except TimeoutError:
                pass

    def _discard(self, consumer: Consumer) -> None:
        """Delete the reply queue, or, if replies may still come (calls in flight, or
        calls and broadcasts that ended unanswered less than :data:`LATE_REPLY_WINDOW`
        ago, lost connections included), empty it but for :data:`TOMBSTONE` and have it
        expire at that window's end.
        """
        now = monotonic()
        last = self._pending.last_deadline()
        expires = (now if last == math.inf else last) + LATE_REPLY_WINDOW
        if expires <= now:
            super()._discard(consumer)
            self._release(consumer.channel)
            return
        try:  # ends a BRPOP still in flight: it cannot take the tombstone
            consumer.channel.close()
        except Exception as exc:
            logger.debug("could not close the reply channel: %s", exc)
        channel = self._conn.channel()
        try:
            with channel.conn_or_acquire() as client, client.pipeline(transaction=True) as pipe:
                pipe.delete(self.reply_queue)
                pipe.rpush(self.reply_queue, TOMBSTONE)
                pipe.pexpire(self.reply_queue, max(1, round((expires - now) * 1000)))
                pipe.execute()
            self._release(channel)
        finally:
            channel.close()

    def _drain_timeout(self, timeout: float) -> float:
        """Half of ``timeout``, down to a last read of :data:`SHORT_READ`.

        kombu's Redis ``drain_events(timeout)`` waits again for the whole ``timeout``
        when a BRPOP ended without a message (every ``brpop_timeout``), so a read can
        last up to twice its timeout: asking for half keeps it within the caller's
        deadline.
        """
        return timeout / 2 if timeout > SHORT_READ else timeout

    def _lost_errors(self) -> tuple[type[BaseException], ...]:
        """The errors of a read that count as a lost connection: the transport's."""
        return broker_errors(self._conn)

    def wake(self) -> None:
        """Push a wake-up message to the reply queue, if someone reads it (best effort)."""
        consumer = self._consumer
        if self._turns.leader is not None and consumer is not None and self._broken is None:
            try:
                self._wake_up(consumer.channel)
            except broker_errors(self._conn, os_errors=True):
                pass

    def _wake_up(self, channel: Any) -> None:
        """Push :data:`~kombu_rpc.protocol.WAKE_UP` to the reply queue on ``channel``
        (a publish does not use the connection the reads wait on)."""
        Producer(channel, auto_declare=False).publish(routing_key=self.reply_queue, **wake_up_message())

    def withdraw(self, queue: str, correlation_id: str) -> None:
        """Have the publisher thread take back an unanswered request."""
        if queue:
            self._outbox.put(_Withdrawal(queue, correlation_id))


def _give_up(conn: Connection, held: Lease) -> None:
    """Give up ``held`` on a connection of its own (at interpreter exit: the proxy's
    may be in use by its threads), best effort: it runs out by itself anyway."""
    try:
        with conn:
            held.release(conn.default_channel)
    except Exception as exc:
        logger.debug("could not give up the reply queue's lease at exit: %s", exc)
