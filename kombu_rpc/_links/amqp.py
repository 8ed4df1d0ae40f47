"""The RabbitMQ link: publishes requests and reads replies, confirms and returns on one
AMQP channel.

A caller publishes its own request, under the link's I/O lock and within its
deadline, in confirm mode; confirms and returns are handled as they arrive instead of
waited for one by one. Replies are read by select() on the socket, in turns (see
:mod:`kombu_rpc._links.turns`). The link's thread checks the idle connection once a
second and reconnects after a connection error, publishing again every request the
broker had not confirmed.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from time import monotonic
from typing import Any

from kombu import Producer

from .._pending import _Outgoing
from .._transports import unread
from ..connection import broker_errors, reconnect, take_confirmed
from ..errors import ConnectionLostError, NoServerError
from ..metrics import count_event
from ..topology import DIRECT_REPLY_TO, REPLY_QUEUE_TEMPLATE, discard_queue, new_id
from .base import FRAME_WAIT, Link, consume_replies
from .turns import IDLE_WAIT, Closed

logger = logging.getLogger("kombu_rpc.link")  # the name the guide documents

#: Times a request refused by the broker (nacked) is published again, and nacks in a
#: row after which the link reconnects.
NACK_LIMIT = 3


class AmqpLink(Link):
    """Publishes requests and reads replies, confirms and returns on one AMQP channel.

    Takes the arguments of :class:`~kombu_rpc._links.base.Link` (its calls in flight
    are also failed here by returns and nacks); ``confirm`` puts the channel in confirm
    mode and publishes requests ``mandatory``.
    """

    keeps_exchanges = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Lock order: the turns' lock before _io, never the other way round.
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
        self._turns.start()

    def _close_reading(self) -> None:
        """Stop the link's thread, cancel the consumer and close the connection."""
        self._turns.stop()
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
        self._consumer = consume_replies(channel, self.reply_queue, self._on_reply, self._accept)
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
            count_event("publish_nacks")
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

    def has_work(self) -> bool:
        """True while calls are in flight that no caller will come back for, or
        requests not yet confirmed, unless a caller will come back to read (a
        ``map``'s caller reads the confirms of its own requests)."""
        pending = self._pending
        return pending.unawaited() > 0 or bool(self._unconfirmed and not pending.awaited())

    def read(self, timeout: float) -> None:
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
            except broker_errors(self._conn, os_errors=True) as exc:
                self._lose(exc)

    def _lose(self, exc: BaseException) -> None:
        """Note a lost connection (under the I/O lock); the link's thread reconnects."""
        if self._broken is None:
            logger.warning("the proxy lost its connection (%s); reconnecting", exc)
            count_event("reconnects")
            self._broken = exc
        self.wake()
        self._turns.notify_thread()

    def wake(self) -> None:
        """Make a leader's select() return: write to the wake-up socket."""
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):  # full (a wake-up is pending anyway) or closed
            pass

    def work(self, timeout: float) -> None:
        """Reconnect, or read: for calls nobody waits on, else (``timeout`` 0) to check
        the idle connection (EOF, heartbeats)."""
        try:
            if self._broken is not None:
                self._recover()
                return
            self.read(timeout)
        except broker_errors(self._conn, channel=False, os_errors=True) as exc:
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
            # Closed) loses none of them.
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
                    reconnect(self._conn, self._retry_policy, self._turns.check_closing)
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
                    if self._turns.wait_closing(delay):
                        raise Closed() from None
            resend, self._unsent = self._unsent, []
            self._broken = None
            self._nacks = 0
            logger.info("the proxy reconnected; publishing %d request(s) again", len(resend))
            for job in resend:
                if self._broken is not None:
                    self._unsent.append(job)
                elif job.wanted(self._pending):
                    self._publish(job)
