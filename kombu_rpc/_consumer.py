"""The server's consume loop: connect, declare, consume, reconnect, stop.

:class:`ConsumeLoop` owns the server's connection while it serves: it declares the
request, broadcast and control queues, hands each delivery to the dispatcher
(:mod:`kombu_rpc._dispatch`), runs the call inline or in the worker pool
(:mod:`kombu_rpc._execution`), has the reply published and the request settled
(:mod:`kombu_rpc._replies`), and reconnects after a lost connection until stopped.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from time import monotonic
from typing import Any, Protocol

from kombu import Connection, Consumer, Producer
from kombu.message import Message

from . import metrics, protocol
from ._cancelling import CancelListener
from ._dispatch import Dispatcher, Disposal, PartNotSent, Refused
from ._execution import EventLoop, WorkerPool
from ._replies import ACK, REQUEUE, ReplyPublisher
from ._transports import (
    REDIS_SOCKET_TIMEOUT,
    Kind,
    Lease,
    close_channel,
    kind,
    lease,
    start_listening,
    unread,
)
from .connection import Heartbeater, broker_errors, reconnect, safe_uri
from .errors import ConfigurationError, ConnectionLostError, SerializationError
from .events import Subscription, decode_event, handle_event
from .topology import CONTROL_QUEUE_TEMPLATE, broadcast_queue, discard_queue, private_queue, request_queue

logger = logging.getLogger("kombu_rpc.server")

#: Longest time the consume loop blocks (bounds heartbeat checks).
IDLE_WAIT = 1.0
#: Acks must be sent from the thread that owns the channel, so with ``concurrency > 1``
#: the consume loop must notice when a worker finishes. On AMQP a worker wakes it at
#: once through a socket pair (:meth:`ConsumeLoop._wait_amqp`); on Redis and memory://,
#: while calls are in flight, the loop polls with a wait that starts at ``_POLL_MIN``
#: and doubles up to ``_POLL_MAX``.
_POLL_MIN, _POLL_MAX = 0.0005, 0.05
#: On AMQP, seconds after (re)consuming when the server first checks that its queues
#: still exist (a cluster deletes a dead node's queues moments after a client declared
#: them again), then four times as long after each check, up to ``_VERIFY_MAX``.
_VERIFY_FIRST, _VERIFY_MAX = 0.5, 30.0
#: Longest wait at start for the cancel listener to consume (it goes on trying after).
_LISTENER_START = 10.0


class Settings(Protocol):
    """What the consume loop reads from its server while it runs."""

    #: Seconds a graceful stop waits for calls in flight (may change while serving).
    shutdown_timeout: float


class ConsumeLoop:
    """Serves a dispatcher's requests from a queue until stopped.

    Args:
        connection: The server's connection (cloned for serving, never used itself).
        dispatcher: Turns requests into replies.
        settings: The server, read for its :attr:`~Settings.shutdown_timeout`.
        concurrency: Calls run at once; above 1, in a pool.
        prefetch_count: Requests taken from the broker ahead.
        durable, queue_arguments: How the request queue is declared.
        retry_policy: The first connect's and the replies' retry policy.
        confirm_publish: On AMQP, publish replies with publisher confirms.
        event_loop: The dispatcher's loop for ``async def`` functions, stopped after
            each run.
    """

    def __init__(
        self,
        connection: Connection,
        dispatcher: Dispatcher,
        settings: Settings,
        concurrency: int,
        prefetch_count: int,
        durable: bool,
        queue_arguments: dict[str, Any] | None,
        retry_policy: dict[str, Any],
        confirm_publish: bool,
        event_loop: EventLoop,
    ) -> None:
        self._connection = connection
        self._dispatcher = dispatcher
        self._settings = settings
        self._queue = dispatcher.queue
        self._server_id = dispatcher.server_id
        self._concurrency = concurrency
        self._prefetch_count = prefetch_count
        self._durable = durable
        self._queue_arguments = queue_arguments
        self._retry_policy = retry_policy
        self._confirm_publish = confirm_publish
        self._control_queue = CONTROL_QUEUE_TEMPLATE.format(server_id=self._server_id)
        self._event_loop = event_loop
        self.publisher = ReplyPublisher(connection, retry_policy, confirm_publish, self._queue)
        self.stopping = threading.Event()
        # Held by stop() while it wakes the loop (re-entrant: a signal handler may stop
        # the server while its own thread holds it).
        self._waking = threading.RLock()
        self.ready = threading.Event()  # consuming now
        self.started = threading.Event()  # consuming, or failed to start
        self._serving = threading.Lock()  # held while a run serves
        #: The worker pool of the current run (``concurrency > 1``), else ``None``.
        self.pool: WorkerPool | None = None
        self._generation = 0
        self._connection_errors: tuple[type[BaseException], ...] = ()
        # AMQP with heartbeats, calls run inline: beats while a call runs
        self._heartbeater: Heartbeater | None = None
        # reads the cancels of this run's calls (not on polling transports)
        self._cancel_listener: CancelListener | None = None
        # bound once: the hot path of each request
        self._prepare = dispatcher.prepare
        self._run = dispatcher.run
        self._publish_reply = self.publisher.publish_reply
        dispatcher.parts = self.publisher  # items, progress and keepalives
        self._settle_message = self.publisher.settle

    # -- stopping ---------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop; returns at once (see :meth:`kombu_rpc.server.RPCServer.stop`)."""
        with self._waking:  # the loop deletes its control queue after this, never during it
            self.stopping.set()
            pool = self.pool
            if pool is not None:
                with pool.cond:
                    pool.cond.notify_all()
            if self.ready.is_set():  # otherwise no loop waits in drain_events
                self._wake()

    def _wake(self) -> None:
        """Publish a control message so the consume loop leaves ``drain_events``.

        A fresh connection is used: this may run in a signal handler, interrupting
        a thread that is using the server's own connections.
        """
        try:
            with self._connection.clone() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0)
                self._send_wake_up(conn.default_channel)
        except Exception as exc:  # the loop still sees the flag within IDLE_WAIT
            logger.debug("could not wake server %s: %s", self._server_id, exc)

    def _send_wake_up(self, channel: Any) -> None:
        """Publish a wake-up to this server's control queue on ``channel``."""
        Producer(channel, auto_declare=False).publish(
            exchange="", routing_key=self._control_queue, **protocol.wake_up_message()
        )

    def _check_stopping(self) -> None:
        if self.stopping.is_set():
            raise _Stopped()

    # -- serving ----------------------------------------------------------------------

    def serve(self) -> None:
        """Serve until stopped (one run at a time).

        Raises:
            ConfigurationError: The loop is already serving.
            ConnectionLostError: The broker could not be reached, or the queues not
                consumed, at start.
        """
        if not self._serving.acquire(blocking=False):
            raise ConfigurationError("this server is already running; create another RPCServer")
        try:
            self._serve_once()
        finally:
            self._serving.release()

    def _serve_once(self) -> None:
        conn = self._connection.clone()
        transport_kind = kind(conn)
        # On a polling transport, any error of the transport's client (a database
        # driver's, a half-written file's) counts as a lost connection; elsewhere, so
        # does a channel error once the server consumed (a queue re-declared right
        # after a cluster node died: 404 NOT_FOUND, 405 RESOURCE_LOCKED).
        errors = (Exception,) if transport_kind is Kind.POLLING else broker_errors(conn)
        self._connection_errors = errors
        try:
            conn.ensure_connection(**self._retry_policy)
        except Exception as exc:  # refused logins too (AccessRefused is no connection error)
            conn.release()
            raise ConnectionLostError(
                f"cannot connect to {safe_uri(conn)}: {type(exc).__name__}: {exc}"
            ) from exc
        self.publisher.start(errors)  # new reply producers for this run
        if self._concurrency > 1:
            self.pool = WorkerPool(
                self._concurrency, self._run, self._publish_reply, wake_up=transport_kind is Kind.AMQP
            )
        if transport_kind is Kind.AMQP and conn.heartbeat:
            # for the calls run inline, and for event handlers, which always are
            if self.pool is None:
                self._heartbeater = self.publisher.heartbeater = Heartbeater()
            elif self._dispatcher.registry.subscriptions():
                self._heartbeater = Heartbeater()
        try:
            if transport_kind is not Kind.POLLING:
                self._start_cancel_listener()
            consumed = False  # consuming worked at least once
            delay = 0.0  # before reconnecting: grows while attempts keep failing at once
            while not self.stopping.is_set():
                began = monotonic()
                try:
                    self._consume(conn)
                except errors as exc:
                    consumed = consumed or self.ready.is_set()
                    self.ready.clear()
                    self._generation += 1
                    if not consumed and not isinstance(exc, broker_errors(conn, channel=False)):
                        # never consumed: a setting (a missing folder, a bad database
                        # URL, a queue declared with other arguments), not an outage
                        raise ConnectionLostError(
                            f"cannot consume on {safe_uri(conn)}: {type(exc).__name__}: {exc}"
                        ) from exc
                    # an error that is not the transport's own may be a bug: show where
                    logger.warning(
                        "server lost its connection (%s); reconnecting",
                        exc,
                        exc_info=not isinstance(exc, broker_errors(conn)),
                    )
                    metrics.count_server_event(self._queue, "reconnects")
                    if monotonic() - began > IDLE_WAIT:
                        delay = 0.0
                    elif self.stopping.wait(delay):
                        break
                    else:
                        delay = min(max(0.1, 2 * delay), self._retry_policy["interval_max"])
                    reconnect(conn, self._retry_policy, self._check_stopping)
        except _Stopped:
            pass
        finally:
            self.ready.clear()
            self._drain_in_flight()
            pool, self.pool = self.pool, None
            if pool is not None:
                pool.close()
            listener, self._cancel_listener = self._cancel_listener, None
            if listener is not None:  # once no call runs any more
                listener.close()
            self._event_loop.stop()  # the dispatcher's, for async def functions
            heartbeater, self._heartbeater = self._heartbeater, None
            self.publisher.heartbeater = None
            if heartbeater is not None:
                heartbeater.close()
            self.publisher.close()
            conn.release()
            logger.info("server %s on %r stopped", self._server_id, self._queue)

    def _start_cancel_listener(self) -> None:
        """Start reading cancels (on a connection and thread of their own: this thread
        may be running a call when one comes), before the server is ready."""
        dispatcher = self._dispatcher
        self._cancel_listener = CancelListener(
            self._connection,
            self._queue,
            self._server_id,
            dispatcher.cancels,
            dispatcher.secret,
            dispatcher.signature_window,
            self._retry_policy,
            self._waking,
        )
        self._cancel_listener.start(timeout=_LISTENER_START)

    def _consume(self, conn: Connection) -> None:
        amqp = kind(conn) is Kind.AMQP
        channel = conn.channel()
        self.publisher.bind(channel, amqp and self._confirm_publish)
        if self._heartbeater is not None:
            self._heartbeater.bind(channel.connection)
        requests = request_queue(self._queue, self._durable, self._queue_arguments)(channel)
        control = private_queue(self._control_queue)(channel)
        broadcasts = broadcast_queue(self._queue, self._server_id)(channel)
        subscriptions = self._dispatcher.registry.subscriptions()
        events = [subscription.queue(self._server_id)(channel) for subscription in subscriptions]
        own = [control, broadcasts, *(queue for queue in events if queue.exclusive)]
        held = lease(conn, channel, self._server_id, own)  # on Redis: swept if this server dies
        for_requests, for_broadcasts = (
            Consumer(
                channel,
                [queue],
                on_message=self._on_request,
                accept=self._dispatcher.accept,
                prefetch_count=self._prefetch_count,
                on_decode_error=self._on_decode_error,
            )
            for queue in (requests, broadcasts)
        )
        consumers = [for_broadcasts, Consumer(channel, [control], on_message=lambda _: None, no_ack=True)]
        # Events are handled on this thread, one at a time (no prefetch of their own:
        # on virtual transports the channel's prefetch count is the requests').
        consumers += [
            Consumer(channel, [queue], on_message=self._event_callback(subscription))
            for subscription, queue in zip(subscriptions, events, strict=True)
        ]
        # After a reconnect on AMQP the server is ready once its queues were seen to
        # outlast a cluster's cleanup; at its first start, at once.
        settling = amqp and self._generation > 0
        verify_every = _VERIFY_FIRST
        verify_at = monotonic() + verify_every if amqp else None
        check: Any = None  # the channel of those checks
        pool = self.pool
        stopping = self.stopping
        try:
            # Requests come once Redis confirmed the fanout subscriptions: kombu reads
            # nothing from PUB/SUB while the channel's prefetch is used up, and the
            # requests' acks wait for this loop
            for consumer in consumers:
                consumer.consume()
            start_listening(conn, channel, REDIS_SOCKET_TIMEOUT)  # on Redis, fanout queues' subscriptions
            for_requests.consume()
            consumers.insert(0, for_requests)  # the first one cancelled
            if kind(conn) is Kind.REDIS:  # end the BRPOP in flight, which lacks the request queue
                self._send_wake_up(channel)
            if not settling:
                self._report_consuming(conn)
            wait = _POLL_MIN
            heartbeats = conn.supports_heartbeats  # only AMQP has them to check
            while not stopping.is_set():
                if held is not None and held.due():
                    held.renew(channel)
                if verify_at is not None and monotonic() >= verify_at:
                    check = check or conn.channel()
                    for queue in (requests, control, broadcasts, *events):
                        # a channel error (404) if it is gone: declared again after
                        # a reconnect, as for a lost connection
                        check.queue_declare(queue=queue.name, passive=True)
                    if settling:
                        settling = False
                        self._report_consuming(conn)
                    verify_every = min(4 * verify_every, _VERIFY_MAX)
                    verify_at = monotonic() + verify_every
                if pool is None:  # calls run inline: nothing in flight between events
                    if heartbeats:
                        conn.heartbeat_check()
                    try:
                        conn.drain_events(timeout=IDLE_WAIT)
                    except TimeoutError:
                        pass
                    continue
                self._settle_finished(pool)
                if heartbeats:
                    conn.heartbeat_check()
                if pool.in_flight >= self._prefetch_count:  # no delivery until an ack
                    with pool.cond:
                        pool.cond.wait_for(lambda: pool.done or stopping.is_set(), IDLE_WAIT)
                    continue
                if pool.wake_r is not None:
                    self._wait_amqp(conn, pool.wake_r)
                    continue
                try:
                    conn.drain_events(timeout=IDLE_WAIT if pool.in_flight == 0 else wait)
                    wait = _POLL_MIN
                except TimeoutError:
                    wait = min(wait * 2, _POLL_MAX)
            for consumer in consumers:
                consumer.cancel()
            self._drain_in_flight()
            self.publisher.await_confirms(conn, self._settings.shutdown_timeout, IDLE_WAIT)
        finally:
            for used in (check, channel):
                if used is not None:
                    # on Redis, a BRPOP in flight gives back what it took; a channel
                    # that cannot close on a lost connection is abandoned, or it would
                    # keep the next one from reading (see close_channel)
                    close_channel(used, self._connection_errors)
            self._discard_own_queues(conn, held)

    def _report_consuming(self, conn: Connection) -> None:
        redis = kind(conn) is Kind.REDIS
        for subscription in self._dispatcher.registry.subscriptions():  # out when running() returns
            if redis and subscription.exchange_type == "fanout" and subscription.group is not None:
                logger.warning(
                    "%s: on Redis a fanout exchange reaches every server of group %r "
                    "(kombu publishes fanout messages through PUB/SUB); use a topic exchange",
                    subscription.name,
                    subscription.group,
                )
            logger.info(
                "server %s handling events of %r (%s, %s) with %s%s",
                self._server_id,
                subscription.exchange,
                subscription.exchange_type,
                ", ".join(map(repr, subscription.binding_keys)),
                subscription.name,
                "" if subscription.group is None else f" in group {subscription.group!r}",
            )
        self.ready.set()
        self.started.set()
        logger.info(  # once ready: seen by tests and by programs watching the log
            "server %s consuming %r on %s: %s",
            self._server_id,
            self._queue,
            safe_uri(conn),
            ", ".join(self._dispatcher.registry.names()),
        )

    def _discard_own_queues(self, conn: Connection, held: Lease | None) -> None:
        """Delete this server's control and broadcast queues (on a channel of their
        own), once no wake-up from :meth:`stop` can be on its way any more: one that
        came later would create the control queue again (a Redis list, forever); then
        give up the lease on them (``held``, on Redis)."""
        with self._waking:
            try:
                channel = conn.channel()
            except self._connection_errors:
                return  # the connection is gone: AMQP dropped the exclusive queues with it
            try:
                discard_queue(private_queue(self._control_queue)(channel))
                discard_queue(broadcast_queue(self._queue, self._server_id)(channel))
                for subscription in self._dispatcher.registry.subscriptions():
                    if subscription.group is None:  # a group's queue outlives its servers
                        discard_queue(subscription.queue(self._server_id)(channel))
                if held is not None:
                    try:
                        held.release(channel)
                    except self._connection_errors:  # it runs out, and is swept, instead
                        pass
            finally:
                try:
                    channel.close()
                except self._connection_errors:
                    pass

    def _wait_amqp(self, conn: Connection, wake_r: socket.socket) -> None:
        """Wait until the broker sends something, a worker finishes (a byte on
        ``wake_r``), or :data:`IDLE_WAIT` passes; handle one method if one came.

        ``select`` does not see a whole frame already read into the transport's buffer
        (or decrypted bytes waiting in a TLS socket): :func:`unread` does.

        Data is there when ``drain_events`` starts, so it returns as soon as a method
        is complete; its timeout only bounds a frame that stalls halfway, or a
        heartbeat frame with nothing after it (``timeout=0`` would spin on the first).
        """
        sock = conn.connection.sock
        if not unread(conn.connection):
            readable, _, _ = select.select([sock, wake_r], [], [], IDLE_WAIT)
            if wake_r in readable:
                wake_r.recv(4096)
            if sock not in readable:
                return
        try:
            conn.drain_events(timeout=_POLL_MAX)
        except TimeoutError:
            pass

    def _drain_in_flight(self) -> None:
        """Wait (up to the server's ``shutdown_timeout``) for calls in flight and settle them."""
        pool = self.pool
        if pool is None:
            return
        deadline = monotonic() + self._settings.shutdown_timeout
        while True:
            try:
                self._settle_finished(pool)
            except self._connection_errors:
                self._generation += 1  # the connection is gone: nothing left can be acked
            remaining = deadline - monotonic()
            if pool.in_flight == 0 or remaining <= 0:
                break
            with pool.cond:
                pool.cond.wait_for(lambda: bool(pool.done), remaining)
        if pool.in_flight:
            logger.warning(
                "stopped with %d call(s) still running; their requests are not acked", pool.in_flight
            )

    # -- handling one request (consuming thread) --------------------------------------

    def _on_request(self, message: Message) -> None:
        recorder = metrics.recorder
        if recorder is not None and (message.delivery_info or {}).get("redelivered"):
            recorder.server_event(self._queue, "redeliveries")
        try:
            job = self._prepare(message)
        except Refused as refused:
            self._dispose(message, refused)
            return
        pool = self.pool
        if pool is not None:
            pool.submit(message, self._generation, job)
            return
        heartbeater = self._heartbeater
        try:
            if heartbeater is None:
                reply = self._run(job)
            else:  # no I/O on the connection meanwhile: another thread sends its heartbeats
                heartbeater.away()
                try:
                    reply = self._run(job)
                finally:
                    heartbeater.back()
        except PartNotSent:  # a stream's item was lost: the request runs again
            self._settle_message(message, REQUEUE)
            return
        self._settle_message(message, ACK if reply is None else self._publish_reply(reply))

    def _event_callback(self, subscription: Subscription) -> Any:
        def on_event(message: Message) -> None:
            self._on_event(subscription, message)

        return on_event

    def _on_event(self, subscription: Subscription, message: Message) -> None:
        """Handle one event: reject a malformed one, else run its handler and ack
        (also when the handler raised: :func:`kombu_rpc.events.handle_event` logged it)."""
        routing_key = (message.delivery_info or {}).get("routing_key") or ""
        try:
            event = decode_event(subscription.exchange, routing_key, message.content_type, message.body)
        except SerializationError as exc:
            logger.warning("rejected a malformed event for %s: %s", subscription.name, exc)
            message.reject(requeue=False)
            outcome = "malformed"
        else:
            heartbeater = self._heartbeater
            if heartbeater is not None:  # no I/O on the connection meanwhile: it sends heartbeats
                heartbeater.away()
            try:
                ok = handle_event(subscription, event, self._event_loop.run)
            finally:
                if heartbeater is not None:
                    heartbeater.back()
            message.ack()
            outcome = "ok" if ok else "error"
        recorder = metrics.recorder
        if recorder is not None:
            recorder.event_handled(subscription.exchange, subscription.name, outcome)

    def _on_decode_error(self, message: Message, exc: Exception) -> None:
        self._dispose(message, self._dispatcher.undecodable(message, exc))

    def _dispose(self, message: Message, refused: Refused) -> None:
        """Answer and settle a request that was not run."""
        reply = refused.reply
        disposal = refused.disposal
        if disposal is Disposal.REJECT:
            if reply is not None:
                self._publish_reply(reply)
            message.reject(requeue=False)
        elif disposal is Disposal.ACK:
            message.ack()
        else:
            self._settle_message(message, ACK if reply is None else self._publish_reply(reply))

    def _settle_finished(self, pool: WorkerPool) -> None:
        """Publish the replies of finished calls handed over, and settle their requests:
        every one there, also those finishing meanwhile (the pool wakes this thread once
        for calls finishing in a row, see :meth:`WorkerPool._work`)."""
        while pool.done:
            message, generation, reply, settlement = pool.take()
            if reply is not None:  # sent even if the request's channel is gone
                settlement = self._publish_reply(reply)
            if generation == self._generation:
                self._settle_message(message, settlement)


class _Stopped(Exception):
    """Raised inside reconnect retries to abandon them once stop() was called."""
