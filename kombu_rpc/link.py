"""How a proxy reads its replies: the waiting callers themselves, in turn.

A caller waiting for a result reads the reply connection itself while nobody else does
(it *leads*); other waiting callers *follow*, and are woken when the leader has read
something or leaves. A link's own thread reads only when nobody waits but calls are in
flight (``call_async``, asyncio). So a sequential call costs no thread hand-off.

* ``AmqpLink`` (RabbitMQ) also publishes the requests, on the channel it reads,
  in confirm mode: a caller publishes its own request, under the link's I/O lock and
  within its deadline, and confirms and returns are handled as they arrive instead of
  waited for one by one. Its thread checks the idle connection once a second and
  reconnects after a connection error, publishing again every request the broker had
  not confirmed.
* ``MemoryLink`` (memory://) only reads; callers publish on a connection of their
  own (a put cannot stall).
* ``PollingLink`` (every other kombu transport) only reads, with kombu's
  ``drain_events``, in slices no longer than the transport's polling interval; the
  client's publisher thread sends the requests. Any error of the transport counts as
  a lost connection, after which its thread reconnects.
* ``RedisLink`` (Redis) is a ``PollingLink`` whose reads are a BRPOP on the reply
  queue: a wake-up message ends one early, and its connection's socket operations are
  bounded by ``FRAME_WAIT``.
"""

from __future__ import annotations

import logging
import math
import select
import socket
import threading
from collections.abc import Callable
from time import monotonic
from typing import Any

from kombu import Connection, Consumer, Producer, Queue

from .connection import broker_errors, reconnect, take_confirmed
from .errors import ConnectionLostError, NoServerError
from .pending import PendingCalls, _Outgoing
from .protocol import WAKE_HEADERS, WAKE_UP
from .topology import DIRECT_REPLY_TO, REPLY_QUEUE_TEMPLATE, discard_queue, new_id, private_queue
from .transports import unread

logger = logging.getLogger(__name__)

#: Longest time anyone blocks reading a connection, and the idle check's period.
IDLE_WAIT = 1.0
#: Longest wait for the rest of a frame whose start has arrived.
FRAME_WAIT = 1.0
#: Longest wait for the link's thread to end at close.
STOP_WAIT = 10.0
#: A Redis read this short is made whole (see ``RedisLink._read``).
SHORT_READ = 0.02
#: Times a request refused by the broker (nacked) is published again, and nacks in a
#: row after which the link reconnects.
NACK_LIMIT = 3


class _Closed(Exception):
    """Raised inside reconnect retries to abandon them once the link closes."""


def consume_replies(
    channel: Any, reply_queue: str, on_reply: Callable[..., None], accept: set[str]
) -> Consumer:
    """Consume the reply queue ``reply_queue`` on ``channel``, declaring it unless it is
    RabbitMQ's direct reply-to pseudo-queue. ``on_reply`` gets each reply, and each
    undecodable one with its decode error."""
    if reply_queue == DIRECT_REPLY_TO:
        queue = Queue(DIRECT_REPLY_TO, no_declare=True)(channel)
    else:
        queue = private_queue(reply_queue)(channel)
        queue.declare()
    consumer = Consumer(channel, [queue], on_message=on_reply, no_ack=True, accept=accept)
    consumer.on_decode_error = on_reply
    consumer.consume()
    return consumer


class _Link:
    """Takes turns reading one connection: waiting callers, or the link's thread.

    Args:
        connection: The proxy's connection (cloned).
        reply_queue: The reply queue's name, or ``amq.rabbitmq.reply-to`` (RabbitMQ's
            direct reply-to, not declared).
        retry_policy: Keywords for ``ensure_connection`` on the first connect.
        pending: The client's calls in flight.
        on_reply: Called with each reply message (and a decode error, if any).
        accept: Content types accepted for replies.
    """

    #: Whether waiting callers read the connection themselves; if not, the link's
    #: thread reads whenever calls are in flight and callers only wait.
    callers_read = True

    def __init__(
        self,
        connection: Connection,
        reply_queue: str,
        retry_policy: dict[str, Any],
        pending: PendingCalls,
        on_reply: Callable[..., None],
        accept: set[str],
    ) -> None:
        self._conn = connection.clone()
        #: The reply queue's name (on AMQP, a new one after each lost connection).
        self.reply_queue = reply_queue
        self._retry_policy = retry_policy
        self._pending = pending
        self._on_reply = on_reply
        self._accept = accept
        self._consumer: Consumer | None = None
        self._turn = threading.Lock()  # who reads: guards the fields below
        self._followers = threading.Condition(self._turn)
        self._idle = threading.Condition(self._turn)  # the link's thread waits here
        self._leader: object | None = None
        self._waiting = 0  # callers in wait(), leading or following
        self._closing = False
        self._thread: threading.Thread | None = None
        self._broken: BaseException | None = None  # set until the link's thread reconnected

    def wait(self, done: Callable[[], bool], timeout: float | None) -> None:
        """Return once ``done()`` or after ``timeout`` seconds, reading the connection
        whenever nobody else does."""
        deadline = None if timeout is None else monotonic() + timeout
        me = object()
        with self._turn:
            self._waiting += 1
        try:
            while not done():
                remaining = IDLE_WAIT if deadline is None else min(IDLE_WAIT, deadline - monotonic())
                if remaining <= 0:
                    return
                with self._turn:
                    if not self.callers_read:
                        self._idle.notify()  # the link's thread reads for this call
                    if self._leader is not None or self._must_act() or self._closing or not self.callers_read:
                        if not done():  # checked under the lock: a wake-up cannot slip by
                            self._followers.wait(remaining)
                        continue
                    self._leader = me
                try:
                    self._read(remaining)
                finally:
                    self._leave()
        finally:
            with self._turn:
                self._waiting -= 1
                if self._waiting == 0 and self._leader is None and self._needs_thread():
                    self._idle.notify()

    def unattended(self) -> None:
        """A call was sent that nobody waits on: have the link's thread read, if idle."""
        with self._turn:
            if self._leader is None and self._waiting == 0:
                self._idle.notify()

    def wake_waiters(self) -> None:
        """Have waiting callers look at their calls again (after they were failed)."""
        with self._turn:
            self._followers.notify_all()

    def _leave(self) -> None:
        """Give up the lead: wake the followers, or the link's thread if it is needed."""
        with self._turn:
            self._leader = None
            self._followers.notify_all()
            if self._needs_thread():
                self._idle.notify()

    def _needs_thread(self) -> bool:
        """True when the link's thread has to act: a reconnect, calls in flight nobody
        reads for, or (where callers do not read) anyone waiting, for a broadcast too."""
        if self._closing or self._must_act():
            return True
        if self.callers_read:
            return self._waiting == 0 and self._has_work()
        return self._waiting > 0 or self._has_work()

    def _consume(self, channel: Any) -> None:
        self._consumer = consume_replies(channel, self.reply_queue, self._on_reply, self._accept)

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kombu_rpc-link", daemon=True)
        self._thread.start()

    def _stop_thread(self) -> bool:
        """Stop the link's thread, and wait (briefly) until no caller reads any more;
        False if the thread did not end within :data:`STOP_WAIT`."""
        with self._turn:
            self._closing = True
            self._idle.notify_all()
            self._followers.notify_all()
        self._wake()
        if self._thread is not None:
            self._thread.join(STOP_WAIT)
            if self._thread.is_alive():  # in a poll nothing bounds (a locked database)
                logger.warning("the link's thread is stuck reading; leaving it and its connection behind")
                return False
        with self._turn:
            self._followers.wait_for(lambda: self._leader is None, IDLE_WAIT)
        return True

    def _run(self) -> None:
        me = object()
        while True:
            with self._turn:
                self._idle.wait_for(lambda: self._leader is None and self._needs_thread(), IDLE_WAIT)
                if self._closing:
                    return
                if self._leader is not None or (self._waiting and self.callers_read and not self._must_act()):
                    continue  # a caller reads
                self._leader = me
                busy = self._needs_thread()
            failed = False
            try:
                self._work(busy)
            except _Closed:
                return
            except Exception:  # a bug must not end the thread calls nobody waits on need
                logger.exception("the link's thread failed; it goes on in %gs", IDLE_WAIT)
                failed = True
            finally:
                self._leave()
            if failed:
                with self._turn:
                    self._idle.wait_for(lambda: self._closing, IDLE_WAIT)

    # -- what a kind of link does ------------------------------------------------------

    def _read(self, timeout: float) -> None:
        """Read what arrives within ``timeout`` seconds (the leader only)."""
        raise NotImplementedError

    def _wake(self) -> None:
        """Make a leader's :meth:`_read` return early."""
        raise NotImplementedError

    def _work(self, busy: bool) -> None:
        """The link thread's turn: read for calls nobody waits on if ``busy``, else take
        what has come anyway (late replies) without waiting."""
        self._read(IDLE_WAIT if busy else 0)

    def _has_work(self) -> bool:
        return bool(len(self._pending))

    def _must_act(self) -> bool:
        """True while only the link's thread may read (a reconnect)."""
        return self._broken is not None

    def _check_closing(self) -> None:
        """Abandon a reconnect (raise ``_Closed``) once the link closes."""
        if self._closing:
            raise _Closed()


class AmqpLink(_Link):
    """Publishes requests and reads replies, confirms and returns on one AMQP channel.

    Takes the arguments of ``_Link`` (its calls in flight are also failed here by
    returns and nacks), and:

    Args:
        confirm: Put the channel in confirm mode and publish requests ``mandatory``.
    """

    def __init__(self, *args: Any, confirm: bool) -> None:
        super().__init__(*args)
        self._confirm = confirm
        # Lock order: _turn before _io, never the other way round.
        self._io = threading.RLock()  # all I/O on the connection (re-entrant: callbacks publish)
        self._closed = False
        self._producer: Producer | None = None
        self._tag = 0  # delivery tag of the last request published on this channel
        self._unconfirmed: dict[int, _Outgoing] = {}
        self._unsent: list[_Outgoing] = []  # to publish after a reconnect
        self._nacks = 0  # nacks since the last ack
        self._next_check = 0.0  # (monotonic) when heartbeats are next checked
        self._frame_wait = FRAME_WAIT  # longest wait for the rest of a frame (see _open)
        self._wake_r: socket.socket  # made by start()
        self._wake_w: socket.socket

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Connect, consume the reply queue, and start the link's thread.

        Raises:
            Exception: What connecting raised (the connection errors of kombu's
                transport), after the retry policy's attempts.
        """
        with self._io:
            try:
                self._conn.ensure_connection(**self._retry_policy)
                self._open()
            except BaseException:
                self._conn.release()
                raise
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._start_thread()

    def close(self) -> None:
        """Stop the link's thread, cancel the consumer and close the connection (once
        :meth:`start` succeeded)."""
        self._stop_thread()
        with self._io:
            self._closed = True
            consumer, self._consumer = self._consumer, None
            if consumer is not None and self._broken is None:
                try:
                    consumer.cancel()
                    if self.reply_queue != DIRECT_REPLY_TO:
                        for queue in consumer.queues:
                            discard_queue(queue)
                except broker_errors(self._conn, os_errors=True):
                    pass
            self._conn.release()
        self.wake_waiters()
        self._wake_r.close()
        self._wake_w.close()

    def _open(self) -> None:
        """Open the channel: confirm mode, return handler, reply queue and its consumer."""
        channel = self._conn.channel()
        if self._confirm:
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)
        self._consume(channel)
        self._producer = Producer(channel, auto_declare=False)
        self._tag = 0
        # py-amqp's drain_events reads on past heartbeat frames, each read waiting up to
        # its timeout: a wait as long as the broker's heartbeat spacing (half the
        # interval) would never end while the broker only beats, and the leader would
        # send none. A quarter of the interval ends between two of them.
        heartbeat = self._conn.connection.heartbeat or 0
        self._frame_wait = min(FRAME_WAIT, heartbeat / 4) if heartbeat else FRAME_WAIT

    # -- publishing ----------------------------------------------------------------------

    def submit(self, job: _Outgoing, attended: bool) -> None:
        """Publish ``job`` from the calling thread, within its publish timeout.

        ``attended``: the caller will :meth:`wait` for the result, so the link's thread
        need not read for it. During a reconnect the request is published after it.
        """
        limit = job.publish_timeout()
        if not self._io.acquire(timeout=limit):
            job.fail(
                self._pending,
                ConnectionLostError(
                    f"request to {job.queue!r} not sent: the broker connection was busy for {limit:.3g}s"
                ),
            )
            return
        try:
            if self._closed:
                job.fail(self._pending, ConnectionLostError("the proxy is closed"))
            elif not job.claim(self._pending):
                return
            elif self._broken is not None:
                self._unsent.append(job)
            else:
                self._publish(job)
        finally:
            self._io.release()
        if not attended:
            self.unattended()

    def _publish(self, job: _Outgoing) -> None:
        """Publish one claimed request (under the I/O lock)."""
        assert self._producer is not None
        if job.correlation_id is not None and job.properties.get("reply_to") != self.reply_queue:
            job.readdress(self.reply_queue)  # encoded before a reconnect renamed the queue
        job.written = True
        try:
            self._producer.publish(**job.publish_args(self._confirm))
        except broker_errors(self._conn, connection=False) as exc:  # the broker closed the channel
            job.fail(self._pending, ConnectionLostError(f"cannot publish to {job.queue!r}: {exc}"))
            self._lose(exc)
            return
        except broker_errors(self._conn, channel=False, operational=True, os_errors=True) as exc:
            job.written = False  # a frame cut short: the broker drops it
            self._unsent.append(job)  # published again after the reconnect
            self._lose(exc)
            return
        if self._confirm:
            self._tag += 1
            self._unconfirmed[self._tag] = job
        else:
            job.done()

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._nacks = 0
        for job in self._confirmed(delivery_tag, multiple):
            job.done()

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        """The broker refused requests (a quorum queue without a leader, a full queue):
        publish each again, up to :data:`NACK_LIMIT` times. After that many nacks in a
        row the channel may be one the broker will never take a message on again (it
        was opened before a new leader was elected): reconnect."""
        self._nacks += 1
        for job in self._confirmed(delivery_tag, multiple):
            job.written = False  # refused: no server got it
            job.nacks += 1
            if job.nacks > NACK_LIMIT:
                job.fail(
                    self._pending,
                    ConnectionLostError(f"the broker refused the request to {job.queue!r} {job.nacks} times"),
                )
            elif self._nacks >= NACK_LIMIT or self._broken is not None:
                self._unsent.append(job)  # published again after the reconnect
            elif job.wanted(self._pending):
                self._publish(job)
        if self._nacks >= NACK_LIMIT:
            self._lose(ConnectionLostError(f"the broker refused {self._nacks} requests in a row"))

    def _confirmed(self, delivery_tag: int, multiple: bool) -> list[_Outgoing]:
        return take_confirmed(self._unconfirmed, delivery_tag, multiple)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        """A ``mandatory`` request no queue took: fail its call (its ack follows)."""
        correlation_id = (getattr(message, "properties", None) or {}).get("correlation_id")
        for job in self._unconfirmed.values():
            if job.properties.get("correlation_id") == correlation_id:
                job.fail(
                    self._pending,
                    NoServerError(f"no queue {job.queue!r} on the broker: is a server running?"),
                )
                return
        logger.warning("the broker returned an unknown request to %r: %s", routing_key or exchange, exc)

    # -- reading -------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(len(self._pending) or self._unconfirmed)

    def _read(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the socket to be readable (or a wake-up), then
        handle every frame already there. Only the leader calls this, whether a caller
        or the link's thread, so it also keeps the heartbeats going."""
        self._check_heartbeats()
        connection = self._conn.connection
        sock = connection.sock
        if not unread(connection):
            try:
                readable, _, _ = select.select([sock, self._wake_r], [], [], timeout)
            except (OSError, ValueError):  # closed under us: the next round sees why
                return
            if self._wake_r in readable:
                try:
                    self._wake_r.recv(4096)
                except BlockingIOError:
                    pass
            if sock not in readable:
                return
        with self._io:
            if self._closed or self._broken is not None:
                return
            try:
                while True:  # one frame at a time, while bytes are waiting
                    self._conn.drain_events(timeout=self._frame_wait)
                    if not (unread(connection) or select.select([sock], [], [], 0)[0]):
                        break
            except TimeoutError:  # the rest of a frame is late: py-amqp keeps the start
                pass
            except (*self._conn.connection_errors, *self._conn.channel_errors, OSError) as exc:
                self._lose(exc)

    def _lose(self, exc: BaseException) -> None:
        """Note a lost connection (under the I/O lock); the link's thread reconnects."""
        if self._broken is None:
            logger.warning("the proxy lost its connection (%s); reconnecting", exc)
            self._broken = exc
        self._wake()
        with self._turn:
            self._idle.notify()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):  # full (a wake-up is pending anyway) or closed
            pass

    def _work(self, busy: bool) -> None:
        """Reconnect, or read: for calls nobody waits on, else to check the idle
        connection (EOF, heartbeats)."""
        try:
            if self._broken is not None:
                self._recover()
                return
            self._read(IDLE_WAIT if busy else 0)
        except (*self._conn.connection_errors, OSError) as exc:
            with self._io:
                self._lose(exc)

    def _check_heartbeats(self) -> None:
        """Send a heartbeat if one is due, and notice a broker whose heartbeats stopped
        (at most once per :data:`IDLE_WAIT`)."""
        now = monotonic()
        if now < self._next_check:
            return
        with self._io:
            if self._closed or self._broken is not None:
                return
            self._next_check = now + IDLE_WAIT
            try:
                self._conn.heartbeat_check()
            except broker_errors(self._conn, channel=False, os_errors=True) as exc:
                self._lose(exc)

    def _recover(self) -> None:
        """Reconnect (until closed) under a new reply queue, and publish again what
        has to go again.

        The reply queue went with the connection (it is exclusive), and on a cluster
        its name may stay locked by a dead node's record: a new name replaces it. So a
        call whose request was written on the lost connection can get no reply: it
        fails at once with :class:`ConnectionLostError` (the request may have run),
        unless it was made with ``retry``; then it is published again, as are
        requests never written or refused (nacked), and casts and broadcasts the
        broker had not confirmed, while their callers wait.
        """
        with self._io:
            # Kept in _unsent until the channel is open again: a failed attempt (or
            # _Closed) loses none of them.
            unconfirmed, self._unconfirmed = list(self._unconfirmed.values()), {}
            self._unsent = [
                *(job for job in unconfirmed if job.correlation_id is None),
                *self._pending.lose_replies(),
                *self._unsent,
            ]
            self.wake_waiters()
            delay = 0.0
            while True:
                try:
                    reconnect(self._conn, self._retry_policy, self._check_closing)
                    if self.reply_queue != DIRECT_REPLY_TO:
                        self.reply_queue = REPLY_QUEUE_TEMPLATE.format(uid=new_id())
                    self._open()
                    break
                except broker_errors(self._conn) as again:
                    # a channel error: a queue still locked or gone on a cluster whose
                    # node just died (405, 404); it settles within moments
                    delay = min(max(0.1, 2 * delay), self._retry_policy["interval_max"])
                    logger.warning(
                        "the proxy cannot open its channel again (%s); retrying in %.1fs", again, delay
                    )
                    with self._turn:
                        if self._idle.wait_for(lambda: self._closing, delay):
                            raise _Closed() from None
            resend, self._unsent = self._unsent, []
            self._broken = None
            self._nacks = 0
            logger.info("the proxy reconnected; publishing %d request(s) again", len(resend))
            for job in resend:
                if self._broken is not None:
                    self._unsent.append(job)
                elif job.wanted(self._pending):
                    self._publish(job)


class MemoryLink(_Link):
    """Reads the reply queue on memory:// (callers publish on a connection of their own).

    Takes the arguments of ``_Link``.
    """

    def start(self) -> None:
        """Declare and consume the reply queue, and start the link's thread."""
        self._conn.ensure_connection(**self._retry_policy)
        self._consume(self._conn.channel())
        self._start_thread()

    def close(self) -> None:
        """Stop the link's thread, delete the reply queue and close the connection."""
        self._stop_thread()
        if self._consumer is not None:
            self._consumer.cancel()
            for queue in self._consumer.queues:
                discard_queue(queue)
        self._conn.release()
        self.wake_waiters()

    def _read(self, timeout: float) -> None:
        try:
            self._conn.drain_events(timeout=timeout)
        except TimeoutError:
            pass

    def _wake(self) -> None:
        self._conn.transport.wake()


class PollingLink(_Link):
    """Reads the reply queue on any kombu transport that polls (the client's publisher
    thread sends the requests).

    Takes the arguments of ``_Link``. Only the link's thread reads, for at most the
    transport's polling interval at a time, while calls are in flight; callers wait
    for their results. A poll is a query to the transport's store (a database, a
    folder) that nothing bounds in time, so a caller who polled could be held past its
    deadline (by a locked SQLite file, a stalled database connection).

    Any exception from the transport counts as a lost connection (kombu's virtual
    transports raise their clients' own errors, such as a database driver's): the
    link's thread then reconnects and consumes the reply queue again; the queue
    outlives the connection, so replies sent meanwhile still arrive.
    """

    callers_read = False

    def start(self) -> None:
        """Connect, declare and consume the reply queue, and start the link's thread.

        Raises:
            Exception: What connecting raised (the connection errors of kombu's
                transport), after the retry policy's attempts.
        """
        try:
            self._conn.ensure_connection(**self._retry_policy)
            self._consume(self._conn.channel())
        except BaseException:
            self._conn.release()
            raise
        self._start_thread()

    def close(self) -> None:
        """Stop the link's thread, delete the reply queue and close the connection."""
        if not self._stop_thread():  # it still uses the connection
            self.wake_waiters()
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
        self.wake_waiters()

    def _before_cancel(self, consumer: Consumer) -> None:
        """Hook: what to do before the consumer is cancelled at close."""

    def _discard(self, consumer: Consumer) -> None:
        """Hook: remove the reply queue of the cancelled ``consumer`` at close."""
        for queue in consumer.queues:
            discard_queue(queue)

    def _read(self, timeout: float) -> None:
        if self._broken is not None:
            return
        try:
            self._conn.drain_events(timeout=self._drain_timeout(timeout))
        except TimeoutError:
            pass
        except self._lost_errors() as exc:
            if self._broken is None and not self._closing:
                logger.warning("the proxy lost its reply connection (%s); reconnecting", exc)
            self._broken = exc  # the leader leaves next, waking the link's thread

    def _drain_timeout(self, timeout: float) -> float:
        """What to ask of ``drain_events`` for a read of at most ``timeout`` seconds:
        no more than one polling interval."""
        interval = getattr(self._conn.transport, "polling_interval", None)
        return timeout if interval is None else min(timeout, interval)

    def _lost_errors(self) -> tuple[type[BaseException], ...]:
        """The errors of a read that count as a lost connection: any."""
        return (Exception,)

    def _wake(self) -> None:
        """Nothing to do: a read ends within one polling interval."""

    def _work(self, busy: bool) -> None:
        """Reconnect, read for calls nobody waits on, or take late replies."""
        if self._broken is not None:
            self._recover()
        else:
            self._read(IDLE_WAIT if busy else 0)

    def _recover(self) -> None:
        """Drop the broken channel, then reconnect and consume the reply queue again,
        retrying (with backoff) until it works or the link closes."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.channel.close()
            except Exception:  # it is broken; closing is only to free it
                pass
        interval = 0.1
        while True:
            try:
                reconnect(self._conn, self._retry_policy, self._check_closing)
                self._consume(self._conn.channel())
                break
            except _Closed:
                raise
            except Exception as again:
                logger.warning("the proxy cannot reconnect (%s); retrying in %.1fs", again, interval)
            with self._turn:
                if self._idle.wait_for(lambda: self._closing, interval):
                    raise _Closed()
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
    """Reads the reply queue on Redis with a BRPOP (the client's publisher thread sends
    the requests); waiting callers read it themselves, in turn.

    Takes the arguments of ``_Link``. Every socket operation of its connection gives up
    after ``FRAME_WAIT`` at most (or the connection's own, shorter
    ``socket_timeout``), so a caller reading a reply that stalls halfway is not held
    much past its deadline; that counts as a lost connection. A waiting BRPOP is ended
    early by a wake-up message pushed to the reply queue.

    At close, the reply queue is deleted unless replies may still come; a reply would
    then make its list again, for ever. So the list is left to expire by itself instead,
    holding :data:`TOMBSTONE`, :data:`LATE_REPLY_WINDOW` after the last deadline (Redis
    keeps a list's time to live when something is pushed to it).
    """

    callers_read = True

    def __init__(self, connection: Connection, *args: Any) -> None:
        super().__init__(connection, *args)
        options = dict(self._conn.transport_options)
        limit = options.get("socket_timeout")
        options["socket_timeout"] = FRAME_WAIT if limit is None else min(limit, FRAME_WAIT)
        self._conn = connection.clone(transport_options=options)

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
        ago), empty it but for :data:`TOMBSTONE` and have it expire at that window's end.
        """
        now = monotonic()
        last = self._pending.last_deadline()
        expires = (now if last == math.inf else last) + LATE_REPLY_WINDOW
        if expires <= now:
            super()._discard(consumer)
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
        return (*self._conn.connection_errors, *self._conn.channel_errors)

    def _wake(self) -> None:
        """Push a wake-up message to the reply queue, if someone reads it (best effort)."""
        consumer = self._consumer
        if self._leader is not None and consumer is not None and self._broken is None:
            try:
                self._wake_up(consumer.channel)
            except broker_errors(self._conn, os_errors=True):
                pass

    def _wake_up(self, channel: Any) -> None:
        """Push :data:`~kombu_rpc.protocol.WAKE_UP` to the reply queue on ``channel``
        (a publish does not use the connection the reads wait on)."""
        Producer(channel, auto_declare=False).publish(
            WAKE_UP.payload,
            routing_key=self.reply_queue,
            headers=dict(WAKE_HEADERS),
            content_type=WAKE_UP.content_type,
            content_encoding=WAKE_UP.content_encoding,
        )
