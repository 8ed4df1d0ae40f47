"""Cancels on the wire: the caller's sender and the server's listener.

A caller that cancels a call does not know which server runs it, so the cancel goes to
every server of the request queue, through the queue's cancel fanout exchange
(:func:`kombu_rpc.topology.cancel_exchange`). Each server reads it on a connection and
thread of its own (:class:`CancelListener`): its consuming thread may be running a call
itself (``concurrency=1``), and could not read meanwhile. See ``docs/design.md``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from time import time
from typing import Any

from kombu import Connection, Consumer, Exchange, Producer
from kombu.message import Message

from . import protocol
from ._cancels import MAX_TTL, CancelledCalls
from ._transports import REDIS_SOCKET_TIMEOUT, Kind, Lease, close_channel, kind, lease, start_listening
from .connection import PUBLISH_TIMEOUT, broker_errors, publishing_clone, reconnect
from .errors import RemoteError
from .topology import CANCEL_QUEUE_TEMPLATE, cancel_exchange, cancel_queue, discard_queue, held_cancels

# The calling side logs as the client, the serving side as the server (the guide's names).
client_logger = logging.getLogger("kombu_rpc.client")
server_logger = logging.getLogger("kombu_rpc.server")

#: Longest time the listener blocks reading (bounds heartbeat checks and stopping).
IDLE_WAIT = 1.0
#: Seconds the sender keeps its connection and thread once it has nothing to send.
SENDER_LINGER = 2.0


# -- the calling side -------------------------------------------------------------------


class CancelSender:
    """Publishes the cancels of one client, in the background: cancelling never waits
    for the broker.

    Its thread starts with the first cancel, publishes on a connection of its own, and
    ends (closing the connection) once idle for :data:`SENDER_LINGER` seconds. Where
    the broker keeps exchanges (RabbitMQ, memory://), a cancel first checks that the
    queue's cancel exchange exists (a passive declare): if none does, no server runs,
    and declaring it would leave it behind.

    Args:
        connection: The client's connection (cloned).
        keeps_exchanges: Whether the broker keeps exchanges (see above).
        secret: Sign the cancels with this key, as the requests.
    """

    def __init__(self, connection: Connection, keeps_exchanges: bool, secret: bytes | None) -> None:
        self._origin = connection
        self._keeps_exchanges = keeps_exchanges
        self._secret = secret
        self._outbox: deque[tuple[str, str, float | None]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def send(self, queue: str, call_id: str, deadline: float | None) -> None:
        """Have a cancel of call ``call_id`` (whose deadline, in seconds since the
        epoch, is ``deadline``) published to the servers of ``queue``; returns at once."""
        with self._cond:
            if self._closed:
                return
            self._outbox.append((queue, call_id, deadline))
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kombu_rpc-cancels", daemon=True)
                self._thread.start()

    def close(self, timeout: float = PUBLISH_TIMEOUT) -> None:
        """Publish the cancels still queued (waiting up to ``timeout`` seconds), then
        stop; later cancels are dropped."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        conn: Connection | None = None
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._outbox or self._closed, SENDER_LINGER)
                    if not self._outbox:
                        self._thread = None  # the next cancel starts another
                        return
                    queue, call_id, deadline = self._outbox.popleft()
                for attempt in (1, 2):  # once more on a fresh connection
                    if conn is None:
                        conn = publishing_clone(self._origin, confirm=False)
                    try:
                        self._publish(conn, queue, call_id, deadline)
                        break
                    except Exception as exc:
                        with contextlib.suppress(Exception):
                            conn.release()
                        conn = None
                        if attempt == 2:
                            client_logger.warning(
                                "could not send the cancel of call %s to %r: %s", call_id, queue, exc
                            )
        finally:
            if conn is not None:
                conn.release()

    def _publish(self, conn: Connection, queue: str, call_id: str, deadline: float | None) -> None:
        conn.ensure_connection(max_retries=1, timeout=PUBLISH_TIMEOUT)
        exchange = cancel_exchange(queue)
        wake = protocol.WAKE_UP
        headers = protocol.cancel_headers(deadline)
        if self._secret is not None:
            headers.update(protocol.signature_headers(self._secret, "cancel", wake, call_id, "", deadline))
        message: dict[str, Any] = {
            "headers": headers,
            "correlation_id": call_id,
            "content_type": wake.content_type,
            "content_encoding": wake.content_encoding,
            "timeout": PUBLISH_TIMEOUT,
        }
        if self._keeps_exchanges and not _exists(conn, exchange):
            self._hold(queue, call_id, deadline, wake.payload, message)
            # a server that bound its cancel queue before this check may have read the
            # held cancels before this one was held: it hears it through the exchange
            if not _exists(conn, exchange):
                client_logger.debug("call %s: no server of %r runs; its cancel waits", call_id, queue)
                return
        channel = conn.channel()
        try:
            Producer(channel).publish(
                wake.payload,
                exchange=exchange,
                routing_key="",
                declare=[] if self._keeps_exchanges else [exchange],
                **message,
            )
            client_logger.debug("call %s: sent its cancel to the servers of %r", call_id, queue)
        finally:
            close_channel(channel, broker_errors(conn))

    def _hold(
        self, queue: str, call_id: str, deadline: float | None, body: Any, message: dict[str, Any]
    ) -> None:
        """Leave the cancel in the queue's held cancels until the call's deadline (at
        most :data:`~kombu_rpc._cancels.MAX_TTL`), confirmed: the next server to start
        reads it before it takes a request."""
        ttl = MAX_TTL if deadline is None else min(MAX_TTL, deadline - time())
        if ttl <= 0:
            return  # past its deadline: no server runs the call any more
        held = held_cancels(queue)
        with publishing_clone(self._origin, confirm=True) as conn:
            Producer(conn).publish(
                body, exchange="", routing_key=held.name, declare=[held], expiration=ttl, **message
            )
        client_logger.debug("call %s: its cancel waits for a server of %r", call_id, queue)


def _exists(conn: Connection, exchange: Exchange) -> bool:
    """Whether ``exchange`` exists (a passive declare, on a channel of its own: one
    that fails closes its channel)."""
    channel = conn.channel()
    try:
        exchange(channel).declare(passive=True)
        return True
    except broker_errors(conn, connection=False):
        return False
    finally:
        close_channel(channel, broker_errors(conn))


# -- the serving side -------------------------------------------------------------------


class CancelListener:
    """Reads the cancels of one server's queue, on a connection and thread of its own,
    into :class:`~kombu_rpc._cancels.CancelledCalls` (whose hook cancels the task of a
    running ``async def`` function).

    Args:
        connection: The server's connection (cloned).
        queue: The request queue whose cancels it reads.
        server_id: The server's id (names its cancel queue).
        cancels: Where cancelled ids go.
        secret: Accept only cancels signed with this key, if set.
        signature_window: Seconds a signed cancel stays valid.
        retry_policy: The connect's retry policy.
        waking: A lock, held by :meth:`close` while it wakes the listener; the
            listener deletes its queue under it.
    """

    def __init__(
        self,
        connection: Connection,
        queue: str,
        server_id: str,
        cancels: CancelledCalls,
        secret: bytes | None,
        signature_window: float,
        retry_policy: dict[str, Any],
        waking: Any,
    ) -> None:
        self._connection = connection
        self._queue = queue
        self._server_id = server_id
        self._cancels = cancels
        self._secret = secret
        self._signature_window = signature_window
        self._retry_policy = retry_policy
        self._waking = waking
        self._closed = threading.Event()
        self._held: Lease | None = None  # the lease on its queue, on Redis
        #: Set while the listener consumes its queue.
        self.ready = threading.Event()
        self.queue_name = CANCEL_QUEUE_TEMPLATE.format(queue=queue, server_id=server_id)
        self._thread = threading.Thread(target=self._run, name="kombu_rpc-cancel-listener", daemon=True)

    def start(self, timeout: float) -> None:
        """Start the thread; return once it consumes, or after ``timeout`` seconds."""
        self._thread.start()
        if not self.ready.wait(timeout):
            server_logger.warning("server %s: cancels are not read yet (no connection)", self._server_id)

    def close(self) -> None:
        """Stop the thread and wait for it (it deletes its queue on its way out).

        The server closes its listener once its calls in flight ended: until then
        they may still be cancelled. The listener is woken by a wake-up message
        through its exchange (kombu's Redis transport reads a queue bound to a fanout
        exchange only through PUB/SUB), on a connection of its own: the server's may
        be lost.
        """
        with self._waking:
            self._closed.set()
            if self.ready.is_set():  # its queue, and so the exchange, exist
                try:
                    with self._connection.clone() as conn:
                        conn.ensure_connection(max_retries=1, interval_start=0)
                        exchange = cancel_exchange(self._queue)
                        Producer(conn).publish(
                            exchange=exchange,
                            routing_key="",
                            declare=[exchange] if kind(conn) is Kind.REDIS else [],
                            **protocol.wake_up_message(),
                        )
                except Exception as exc:  # it sees the flag within IDLE_WAIT
                    server_logger.debug("could not wake the cancel listener of %s: %s", self._server_id, exc)
        if self._thread.is_alive():
            self._thread.join(2 * IDLE_WAIT + PUBLISH_TIMEOUT)

    def _done(self) -> bool:
        return self._closed.is_set()

    def _check_done(self) -> None:
        if self._done():
            raise _Done()

    def _run(self) -> None:
        conn = self._connection.clone()
        errors = broker_errors(conn)
        try:
            first = True
            while not self._done():
                try:
                    if first:
                        first = False
                        conn.ensure_connection(**self._retry_policy)
                    else:
                        reconnect(conn, self._retry_policy, self._check_done)
                    self._listen(conn)
                except _Done:
                    break
                except Exception as exc:
                    self.ready.clear()
                    server_logger.warning(
                        "server %s: the cancel listener reconnects after a broker error (%s)",
                        self._server_id,
                        exc,
                        exc_info=not isinstance(exc, errors),
                    )
                    if self._closed.wait(0.1):
                        break
        finally:
            with self._waking:  # no wake-up is on its way once ready is clear
                self.ready.clear()
                self._discard(conn, errors)
            conn.release()

    def _listen(self, conn: Connection) -> None:
        channel = conn.channel()
        try:
            queue = cancel_queue(self._queue, self._server_id)(channel)
            consumer = Consumer(channel, [queue], on_message=self._on_message, no_ack=True)
            consumer.consume()
            # on Redis; the consume loop's lease sweeps for the server
            self._held = held = lease(conn, channel, self._server_id, [queue], sweeps=False)
            start_listening(conn, channel, REDIS_SOCKET_TIMEOUT)  # on Redis, cancels come by PUB/SUB
            if kind(conn) is not Kind.REDIS:  # where exchanges are kept, cancels may be held
                self._read_held(conn)
            self.ready.set()
            heartbeats = conn.supports_heartbeats
            while not self._done():
                if held is not None and held.due():
                    held.renew(channel)
                if heartbeats:
                    conn.heartbeat_check()
                try:
                    conn.drain_events(timeout=IDLE_WAIT)
                except TimeoutError:
                    pass
        finally:
            close_channel(channel, broker_errors(conn))

    def _discard(self, conn: Connection, errors: tuple[type[BaseException], ...]) -> None:
        """Delete the cancel queue (on AMQP it goes with the connection anyway)."""
        try:
            channel = conn.channel()
        except Exception:  # the connection is gone: on AMQP, with the queue
            return
        try:
            discard_queue(cancel_queue(self._queue, self._server_id)(channel))
            if self._held is not None:
                self._held.release(channel)
        except errors:  # the lease runs out, and is swept, instead
            pass
        finally:
            close_channel(channel, errors)

    def _read_held(self, conn: Connection) -> None:
        """Take in the cancels held while no server ran (:func:`held_cancels`), and
        leave them there for the servers that start next."""
        held = held_cancels(self._queue)
        channel = conn.channel()
        taken: list[Message] = []
        try:
            try:
                _, count, _ = held(channel).queue_declare(passive=True)
            except broker_errors(conn, connection=False):
                return  # none was ever held, or they expired
            for _ in range(count):
                message = held(channel).get(no_ack=False)
                if message is None:
                    break
                taken.append(message)
                self._on_message(message, window=MAX_TTL)  # signed when held: maybe long ago
            for message in taken:
                message.requeue()
        finally:
            close_channel(channel, broker_errors(conn))

    def _on_message(self, message: Message, window: float | None = None) -> None:
        cancel = protocol.read_cancel(message)
        if cancel is None:
            return  # a wake-up, or not a cancel
        call_id, deadline = cancel
        if self._secret is not None:
            try:
                protocol.check_signature(message, self._secret, window or self._signature_window, "cancel")
            except RemoteError as exc:
                server_logger.warning(
                    "server %s: ignored a cancel of call %s: %s", self._server_id, call_id, exc
                )
                return
        server_logger.info("call %s: cancelled by its caller", call_id)
        self._cancels.add(call_id, deadline)


class _Done(Exception):
    """Raised inside reconnect retries to abandon them once the listener stops."""
