"""RPCServer: consume -> validate -> run -> reply -> ack."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import socket
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from time import monotonic
from types import FrameType
from typing import Any

from kombu import Connection, Consumer, Producer
from kombu.entity import PERSISTENT_DELIVERY_MODE
from kombu.message import Message

from . import context, protocol
from .codecs import Codec
from .connection import (
    PUBLISH_TIMEOUT,
    Broker,
    Heartbeater,
    connect,
    publish,
    publishing_clone,
    reconnect,
    safe_uri,
    take_confirmed,
)
from .errors import (
    ConfigurationError,
    ConnectionLostError,
    InvalidArguments,
    MalformedRequest,
    MethodNotFound,
    RemoteError,
    SerializationError,
)
from .options import ServerOptions
from .registry import RESERVED_PREFIX, Procedure, Registry
from .topology import (
    CONTROL_QUEUE_TEMPLATE,
    DEFAULT_QUEUE,
    broadcast_queue,
    discard_queue,
    new_id,
    private_queue,
    request_queue,
)
from .transports import Kind, kind, unread

logger = logging.getLogger(__name__)

#: Longest time the consume loop blocks (bounds heartbeat checks).
IDLE_WAIT = 1.0
#: Acks must be sent from the thread that owns the channel, so with ``concurrency > 1``
#: the consume loop must notice when a worker finishes. On AMQP a worker wakes it at
#: once through a socket pair (:meth:`RPCServer._wait_amqp`); on Redis and memory://,
#: while calls are in flight, the loop polls with a wait that starts at ``_POLL_MIN``
#: and doubles up to ``_POLL_MAX``.
_POLL_MIN, _POLL_MAX = 0.0005, 0.05
#: On AMQP, seconds after (re)consuming when the server first checks that its queues
#: still exist (a cluster deletes a dead node's queues moments after a client declared
#: them again), then four times as long after each check, up to ``_VERIFY_MAX``.
_VERIFY_FIRST, _VERIFY_MAX = 0.5, 30.0


@dataclass(frozen=True)
class _Reply:
    """A reply encoded for publishing."""

    address: protocol.ReplyAddress
    encoded: protocol.Encoded
    headers: dict[str, Any]


class RPCServer:
    """Serves the functions of a :class:`~kombu_rpc.Registry` from a request queue.

    Each request is decoded, checked, run, answered on its ``reply_to`` queue, and only
    then acknowledged (at-least-once, as in the RabbitMQ tutorial).

    Besides the shared request queue, every server consumes a queue of its own bound to
    the queue's broadcast exchange, which reaches all the servers of ``queue`` at once
    (:meth:`kombu_rpc.proxy.MethodProxy.broadcast`); its replies name its
    :attr:`server_id`.

    Args:
        broker: Broker URL or :class:`kombu.Connection` (cloned, not used directly);
            ``None``: the URL in the ``KOMBU_RPC_BROKER_URL`` environment variable.
        registry: The functions to serve; ``None`` serves :data:`~kombu_rpc.registry.default_registry`.
        queue: The request queue to consume.
        concurrency: How many calls run at once; also the prefetch count. With 1,
            calls run in the consuming thread; above 1, in a thread pool.
        accept: Serializers accepted for requests. Code-executing ones (``pickle``,
            ``yaml``) are refused unless listed here.
        send_tracebacks: Whether error replies carry the server-side traceback.
        max_message_size: Largest request body, in bytes, the server decodes; a
            larger one is rejected with a ``MessageTooLarge`` error reply. ``None``
            disables the check.
        durable: Declare the request queue durable (it survives a broker restart).
        queue_type: ``"classic"`` or ``"quorum"``: on RabbitMQ, a quorum request queue
            is replicated over the cluster's nodes and survives the loss of any
            minority of them (see :doc:`/reliability`); it is durable. Other brokers
            ignore it, so the same settings run on memory:// in tests.
        queue_arguments: Broker arguments for declaring the request queue, such as
            ``{"x-delivery-limit": 5}`` for a quorum queue on RabbitMQ (its delivery
            limit drops, or dead-letters, a request that keeps being redelivered).
        retry_policy: Overrides for the first connect and for publishing replies
            (keys of :data:`kombu_rpc.connection.DEFAULT_RETRY_POLICY`). Once
            serving, a lost connection is retried until :meth:`stop`.
        confirm_publish: On AMQP, publish replies with publisher confirms, so a
            reply the broker did not take is retried (the request is requeued)
            rather than lost.
        secret: Accept only requests signed with this key by a proxy created with
            the same ``secret``. Unsigned, tampered, replayed, or signed more than
            :attr:`signature_window` seconds away requests are refused with an
            ``InvalidSignature`` error reply and never run. Replies are signed too.
        codec: The wire format (:mod:`kombu_rpc.codecs`); by default kombu_rpc's own
            :class:`~kombu_rpc.codecs.Envelope`. ``Plain("fib")`` answers the RabbitMQ
            tutorial's clients, running ``fib`` for every request.
    """

    #: Seconds a graceful stop waits for calls in flight before giving up on them.
    shutdown_timeout: float = 30.0
    #: Seconds a signed request stays valid (either way, for clock skew); a signature
    #: seen again within it is a replay.
    signature_window: float = protocol.SIGNATURE_WINDOW
    #: Seconds :meth:`running` waits for the server to be ready.
    startup_timeout: float = 30.0

    def __init__(
        self,
        broker: Broker | None = None,
        registry: Registry | None = None,
        queue: str = DEFAULT_QUEUE,
        concurrency: int = 1,
        accept: tuple[str, ...] | list[str] = ("json",),
        send_tracebacks: bool = True,
        max_message_size: int | None = 10 * 1024 * 1024,
        durable: bool = False,
        queue_type: str = "classic",
        queue_arguments: dict[str, Any] | None = None,
        retry_policy: dict[str, Any] | None = None,
        confirm_publish: bool = True,
        secret: str | bytes | None = None,
        codec: Codec | None = None,
    ) -> None:
        options = ServerOptions(
            registry=registry,
            queue=queue,
            concurrency=concurrency,
            accept=accept,
            send_tracebacks=send_tracebacks,
            max_message_size=max_message_size,
            durable=durable,
            queue_type=queue_type,
            queue_arguments=queue_arguments,
            retry_policy=retry_policy,
            confirm_publish=confirm_publish,
            secret=secret,
            codec=codec,
        )
        #: The server's settings, checked (:class:`~kombu_rpc.options.ServerOptions`).
        self.options = options
        assert options.registry is not None and options.codec is not None
        self.registry: Registry = options.registry
        self.queue = options.queue
        self.concurrency = options.concurrency
        self.accept = frozenset(options.accept)
        self.send_tracebacks = options.send_tracebacks
        self.max_message_size = options.max_message_size
        self.durable = options.durable
        self.queue_type = options.queue_type
        self.queue_arguments = options.queue_arguments
        self.confirm_publish = options.confirm_publish
        self._secret = protocol.secret_bytes(options.secret)
        self.codec: Codec = options.codec
        self._seen_signatures: OrderedDict[str, float] = OrderedDict()
        #: Unique id of this server; names its private control queue.
        self.server_id = new_id()
        self._connection = connect(broker)
        self._retry_policy = dict(options.retry_policy or {})
        self._control_queue = CONTROL_QUEUE_TEMPLATE.format(server_id=self.server_id)
        self._stopping = threading.Event()
        # Held by stop() while it wakes the loop (re-entrant: a signal handler may stop
        # the server while its own thread holds it).
        self._waking = threading.RLock()
        self._ready = threading.Event()  # consuming now
        self._started = threading.Event()  # consuming, or failed to start
        self._serving = threading.Lock()  # held while run() or running() serves
        self._cond = threading.Condition()  # guards _done / _in_flight
        self._done: deque[tuple[Message, int, bool | int | _Reply]] = deque()
        self._in_flight = 0
        self._wake_r: socket.socket | None = None  # AMQP, concurrency > 1: a worker
        self._wake_w: socket.socket | None = None  # finished (one byte per call)
        self._generation = 0
        self._connection_errors: tuple[type[BaseException], ...] = ()
        self._executor: ThreadPoolExecutor | None = None
        self._producers: list[Producer] = []  # every worker thread's reply producer
        self._producers_lock = threading.Lock()
        self._local = threading.local()
        # The consuming thread replies on the channel it consumes from; on AMQP with
        # confirms, a request is acked once the broker confirmed its reply.
        self._consuming_thread: int | None = None
        self._channel_producer: Producer | None = None
        self._confirming = False
        self._reply_tag = 0  # delivery tag of the last reply published on that channel
        self._unconfirmed: dict[int, Message] = {}  # reply tag -> request to ack
        self._loop: asyncio.AbstractEventLoop | None = None  # runs async def functions
        self._loop_lock = threading.Lock()
        # AMQP with heartbeats, calls run inline: beats while a call runs
        self._heartbeater: Heartbeater | None = None
        self._builtins = {
            p.name: p
            for p in (
                Procedure.of(f"{RESERVED_PREFIX}ping", self._ping),
                Procedure.of(f"{RESERVED_PREFIX}describe", self._describe),
            )
        }

    # -- lifecycle -------------------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`stop`, SIGINT or SIGTERM; then stop gracefully.

        Signal handlers are installed only when called from the main thread.

        Raises:
            ConnectionLostError: The broker could not be reached at start.
        """
        self._stopping.clear()
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, self._on_signal)
        try:
            self._serve()
        finally:
            for installed, handler in previous.items():
                signal.signal(installed, handler)

    @contextmanager
    def running(self) -> Iterator[RPCServer]:
        """Serve in a background thread for the duration of a ``with`` block.

        Returns only once the server consumes its queue; stops and joins on exit.

        Raises:
            ConnectionLostError: The broker could not be reached, or the server did
                not become ready within :attr:`startup_timeout`.
        """
        self._stopping.clear()
        failure: list[BaseException] = []

        def target() -> None:
            try:
                self._serve()
            except BaseException as exc:
                failure.append(exc)
            finally:
                self._started.set()

        self._started.clear()
        thread = threading.Thread(target=target, name=f"kombu_rpc-server-{self.queue}", daemon=True)
        thread.start()
        try:
            if not self._started.wait(self.startup_timeout):
                raise ConnectionLostError(f"server not ready within {self.startup_timeout}s")
            if failure:
                raise failure[0]
            yield self
        finally:
            self.stop()
            thread.join()
        if failure:  # the server died while the block ran
            raise failure[0]

    def stop(self) -> None:
        """Ask the server to stop: it stops consuming, finishes calls in flight (up to
        :attr:`shutdown_timeout`), then returns from :meth:`run`. Safe from any thread
        and from signal handlers; returns without waiting."""
        with self._waking:  # the loop deletes its control queue after this, never during it
            self._stopping.set()
            with self._cond:
                self._cond.notify_all()
            if self._ready.is_set():  # otherwise no loop waits in drain_events
                self._wake()

    @property
    def ready(self) -> bool:
        """True while the server is consuming its queue."""
        return self._ready.is_set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        logger.info("received signal %s, stopping gracefully", signum)
        self.stop()

    def _wake(self) -> None:
        """Publish a control message so the consume loop leaves ``drain_events``.

        A fresh connection is used: this may run in a signal handler, interrupting
        a thread that is using the server's own connections.
        """
        try:
            with self._connection.clone() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0)
                wake = protocol.WAKE_UP
                Producer(conn).publish(
                    wake.payload,
                    exchange="",
                    routing_key=self._control_queue,
                    headers=dict(protocol.WAKE_HEADERS),
                    content_type=wake.content_type,
                    content_encoding=wake.content_encoding,
                )
        except Exception as exc:  # the loop still sees the flag within IDLE_WAIT
            logger.debug("could not wake server %s: %s", self.server_id, exc)

    # -- the consume loop ------------------------------------------------------------

    def _serve(self) -> None:
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
        self._connection_errors = (
            (Exception,)
            if transport_kind is Kind.POLLING
            else (*conn.connection_errors, *conn.channel_errors)
        )
        try:
            conn.ensure_connection(**self._retry_policy)
        except Exception as exc:  # refused logins too (AccessRefused is no connection error)
            conn.release()
            raise ConnectionLostError(
                f"cannot connect to {safe_uri(conn)}: {type(exc).__name__}: {exc}"
            ) from exc
        self._local = threading.local()  # new reply producers for this run
        self._executor = (
            ThreadPoolExecutor(self.concurrency, thread_name_prefix="kombu_rpc-worker")
            if self.concurrency > 1
            else None
        )
        if self._executor is not None and transport_kind is Kind.AMQP:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_w.setblocking(False)
        elif transport_kind is Kind.AMQP and conn.heartbeat:
            self._heartbeater = Heartbeater()
        try:
            consumed = False  # consuming worked at least once
            delay = 0.0  # before reconnecting: grows while attempts keep failing at once
            while not self._stopping.is_set():
                began = monotonic()
                try:
                    self._consume(conn)
                except self._connection_errors as exc:
                    consumed = consumed or self._ready.is_set()
                    self._ready.clear()
                    self._generation += 1
                    if not consumed and not isinstance(exc, conn.connection_errors):
                        # never consumed: a setting (a missing folder, a bad database
                        # URL, a queue declared with other arguments), not an outage
                        raise ConnectionLostError(
                            f"cannot consume on {safe_uri(conn)}: {type(exc).__name__}: {exc}"
                        ) from exc
                    # an error that is not the transport's own may be a bug: show where
                    logger.warning(
                        "server lost its connection (%s); reconnecting",
                        exc,
                        exc_info=not isinstance(exc, (*conn.connection_errors, *conn.channel_errors)),
                    )
                    if monotonic() - began > IDLE_WAIT:
                        delay = 0.0
                    elif self._stopping.wait(delay):
                        break
                    else:
                        delay = min(max(0.1, 2 * delay), self._retry_policy["interval_max"])
                    reconnect(conn, self._retry_policy, self._check_stopping)
        except _Stopped:
            pass
        finally:
            self._ready.clear()
            self._drain_in_flight()
            if self._executor is not None:
                self._executor.shutdown(wait=False)
            with self._cond:  # a call still running must not write to a closed socket
                wake_r, wake_w, self._wake_r, self._wake_w = self._wake_r, self._wake_w, None, None
            for sock in (wake_r, wake_w):
                if sock is not None:
                    sock.close()
            self._stop_loop()
            heartbeater, self._heartbeater = self._heartbeater, None
            if heartbeater is not None:
                heartbeater.close()
            with self._producers_lock:
                producers, self._producers = self._producers, []
            for producer in producers:
                producer.connection.release()
            conn.release()
            logger.info("server %s on %r stopped", self.server_id, self.queue)

    def _consume(self, conn: Connection) -> None:
        amqp = kind(conn) is Kind.AMQP
        channel = conn.channel()
        self._reply_on(channel, amqp and self.confirm_publish)
        requests = request_queue(self.queue, self.durable, self.queue_arguments)(channel)
        control = private_queue(self._control_queue)(channel)
        broadcasts = broadcast_queue(self.queue, self.server_id)(channel)
        consumers = [
            Consumer(
                channel,
                [requests, broadcasts],
                on_message=self._on_request,
                accept=self.accept,
                prefetch_count=self.concurrency,
                on_decode_error=self._on_decode_error,
            ),
            Consumer(channel, [control], on_message=lambda message: None, no_ack=True),
        ]
        # After a reconnect on AMQP the server is ready once its queues were seen to
        # outlast a cluster's cleanup; at its first start, at once.
        settling = amqp and self._generation > 0
        verify_every = _VERIFY_FIRST
        verify_at = monotonic() + verify_every if amqp else None
        check: Any = None  # the channel of those checks
        try:
            for consumer in consumers:
                consumer.consume()
            if not settling:
                self._report_consuming(conn)
            wait = _POLL_MIN
            heartbeats = conn.supports_heartbeats  # only AMQP has them to check
            while not self._stopping.is_set():
                if verify_at is not None and monotonic() >= verify_at:
                    check = check or conn.channel()
                    for queue in (requests, control, broadcasts):
                        # a channel error (404) if it is gone: declared again after
                        # a reconnect, as for a lost connection
                        check.queue_declare(queue=queue.name, passive=True)
                    if settling:
                        settling = False
                        self._report_consuming(conn)
                    verify_every = min(4 * verify_every, _VERIFY_MAX)
                    verify_at = monotonic() + verify_every
                self._settle()
                if heartbeats:
                    conn.heartbeat_check()
                if self._in_flight >= self.concurrency:  # no delivery until an ack
                    with self._cond:
                        self._cond.wait_for(lambda: self._done or self._stopping.is_set(), IDLE_WAIT)
                    continue
                if self._wake_r is not None:
                    self._wait_amqp(conn, self._wake_r)
                    continue
                try:
                    conn.drain_events(timeout=IDLE_WAIT if self._in_flight == 0 else wait)
                    wait = _POLL_MIN
                except TimeoutError:
                    wait = min(wait * 2, _POLL_MAX)
            for consumer in consumers:
                consumer.cancel()
            self._drain_in_flight()
            self._await_confirms(conn)
        finally:
            for used in (check, channel):
                try:
                    if used is not None:
                        used.close()  # on Redis, a BRPOP in flight gives back what it took
                except (*self._connection_errors, *conn.channel_errors):
                    pass
            self._discard_own_queues(conn)

    def _report_consuming(self, conn: Connection) -> None:
        self._ready.set()
        self._started.set()
        logger.info(
            "server %s consuming %r on %s: %s",
            self.server_id,
            self.queue,
            safe_uri(conn),
            ", ".join(self.registry.names()),
        )

    def _discard_own_queues(self, conn: Connection) -> None:
        """Delete this server's control and broadcast queues (on a channel of their
        own), once no wake-up from :meth:`stop` can be on its way any more: one that
        came later would create the control queue again (a Redis list, forever)."""
        with self._waking:
            try:
                channel = conn.channel()
            except (*self._connection_errors, *conn.channel_errors):
                return  # the connection is gone: AMQP dropped the exclusive queues with it
            try:
                discard_queue(private_queue(self._control_queue)(channel))
                discard_queue(broadcast_queue(self.queue, self.server_id)(channel))
            finally:
                try:
                    channel.close()
                except (*self._connection_errors, *conn.channel_errors):
                    pass

    def _reply_on(self, channel: Any, confirming: bool) -> None:
        """Have the consuming thread reply on ``channel`` (in confirm mode if ``confirming``)."""
        self._consuming_thread = threading.get_ident()
        self._channel_producer = Producer(channel, auto_declare=False)
        self._confirming = confirming
        self._reply_tag = 0
        self._unconfirmed = {}  # a lost channel's requests are redelivered anyway
        if self._heartbeater is not None:
            self._heartbeater.bind(channel.connection)
        if confirming:
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_reply_confirmed)
            channel.events["basic_nack"].add(self._on_reply_refused)

    def _on_reply_confirmed(self, delivery_tag: int, multiple: bool) -> None:
        for message in self._confirmed(delivery_tag, multiple):
            self._settle_message(message, True)

    def _on_reply_refused(self, delivery_tag: int, multiple: bool) -> None:
        for message in self._confirmed(delivery_tag, multiple):
            logger.error("the broker refused a reply; requeueing its request")
            self._settle_message(message, False)

    def _confirmed(self, delivery_tag: int, multiple: bool) -> list[Message]:
        return take_confirmed(self._unconfirmed, delivery_tag, multiple)

    def _await_confirms(self, conn: Connection) -> None:
        """Before a graceful stop, read the confirms of replies already sent, so that
        their requests are acked rather than redelivered (up to :attr:`shutdown_timeout`)."""
        deadline = monotonic() + self.shutdown_timeout
        while self._unconfirmed and (remaining := deadline - monotonic()) > 0:
            try:
                conn.drain_events(timeout=min(remaining, IDLE_WAIT))
            except TimeoutError:
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
        """Wait (up to :attr:`shutdown_timeout`) for calls in flight and settle them."""
        deadline = monotonic() + self.shutdown_timeout
        while True:
            try:
                self._settle()
            except self._connection_errors:
                self._generation += 1  # the connection is gone: nothing left can be acked
            remaining = deadline - monotonic()
            if self._in_flight == 0 or remaining <= 0:
                break
            with self._cond:
                self._cond.wait_for(lambda: bool(self._done), remaining)
        if self._in_flight:
            logger.warning(
                "stopped with %d call(s) still running; their requests are not acked", self._in_flight
            )

    def _check_stopping(self) -> None:
        if self._stopping.is_set():
            raise _Stopped()

    # -- handling one request ---------------------------------------------------------

    def _on_decode_error(self, message: Message, exc: Exception) -> None:
        self._refuse(message, MalformedRequest("DecodeError", f"body could not be decoded: {exc}"))

    def _refuse(self, message: Message, error: MalformedRequest) -> None:
        """Reject a message that is not a valid request (never requeued)."""
        call_id = (message.properties or {}).get("correlation_id")
        logger.warning("call %s: rejected a malformed request on %r: %s", call_id or "-", self.queue, error)
        address = protocol.reply_address(message)
        if address is not None:
            self._reply(address, protocol.error_body(error, self.send_tracebacks), "json")
        message.reject(requeue=False)

    def _on_request(self, message: Message) -> None:
        size = len(message.body or b"")
        if self.max_message_size is not None and size > self.max_message_size:
            self._refuse(
                message,
                MalformedRequest(
                    "MessageTooLarge",
                    f"request body of {size} bytes exceeds max_message_size={self.max_message_size}",
                ),
            )
            return
        try:
            if self._secret is not None:
                self._check_signature(message, self._secret)
            request = self.codec.decode_request(message)
        except MalformedRequest as error:
            self._refuse(message, error)
            return
        address = protocol.reply_address(message)
        call = context.received(
            message.headers,
            (message.properties or {}).get("correlation_id"),
            request.method,
            self.server_id,
            request.deadline,
        )
        if request.expired():
            logger.warning(
                "call %s: dropped a request for %r that arrived after its deadline",
                call.call_id,
                request.method,
            )
            message.ack()
            return
        serializer = protocol.serializer_for(message.content_type, self.accept)
        procedure = self._builtins.get(request.method) or self.registry.get(request.method)
        refusal: RemoteError | None = None
        if procedure is None:
            refusal = MethodNotFound("MethodNotFound", f"no remote function named {request.method!r}")
        else:
            try:
                procedure.check_arguments(request.args, request.kwargs)
            except TypeError as exc:
                refusal = InvalidArguments("TypeError", f"{request.method}(): {exc}")
        if refusal is not None:
            logger.info("call %s: refused a call to %r: %s", call.call_id, request.method, refusal)
            sent = address is None or self._reply(
                address, protocol.error_body(refusal, self.send_tracebacks), serializer
            )
            self._settle_message(message, sent)
            return
        assert procedure is not None
        if self._executor is None:
            heartbeater = self._heartbeater
            if heartbeater is None:
                reply = self._execute(procedure, request, call, message, address, serializer)
            else:  # no I/O on the connection meanwhile: another thread sends its heartbeats
                heartbeater.away()
                try:
                    reply = self._execute(procedure, request, call, message, address, serializer)
                finally:
                    heartbeater.back()
            self._settle_message(message, self._answer(reply))
            return
        generation = self._generation
        with self._cond:
            self._in_flight += 1
        self._executor.submit(
            self._execute_in_worker, message, generation, procedure, request, call, address, serializer
        )

    def _execute_in_worker(
        self,
        message: Message,
        generation: int,
        procedure: Procedure,
        request: protocol.Request,
        call: context.CallContext,
        address: protocol.ReplyAddress | None,
        serializer: str,
    ) -> None:
        # With a wake-up pair (AMQP) the consuming thread publishes the reply, on its
        # channel, confirmed as it reads; otherwise the worker publishes it.
        reply = self._execute(procedure, request, call, message, address, serializer)
        outcome = reply if self._wake_w is not None and reply is not None else self._answer(reply)
        with self._cond:
            self._done.append((message, generation, outcome))
            self._cond.notify_all()
            if self._wake_w is not None:
                try:
                    self._wake_w.send(b"\0")
                except BlockingIOError:  # full: the loop has wake-ups pending anyway
                    pass

    def _execute(
        self,
        procedure: Procedure,
        request: protocol.Request,
        call: context.CallContext,
        message: Message,
        address: protocol.ReplyAddress | None,
        serializer: str,
    ) -> _Reply | None:
        """Run the function as the current call; returns its reply, encoded for
        publishing (``None`` for a cast)."""
        started = monotonic()
        with context.server_span(call, self.queue, message.headers) as span:
            try:
                result = procedure.func(*request.args, **request.kwargs)
                if procedure.is_coroutine:  # runs in a copy of this context: current_call() works
                    result = asyncio.run_coroutine_threadsafe(result, self._event_loop()).result()
                body = protocol.result_body(result)
                outcome = "ok"
            except BaseException as exc:  # SystemExit too must be answered
                context.record_error(span, exc)
                body = protocol.error_body(exc, self.send_tracebacks)
                outcome = type(exc).__name__
                what = "cast" if address is None else "call"
                if isinstance(exc, procedure.expected):
                    logger.info(
                        "call %s: %s %s raised %s: %s", call.call_id, what, request.method, outcome, exc
                    )
                else:
                    logger.error("call %s: %s %s failed", call.call_id, what, request.method, exc_info=exc)
        logger.debug(
            "call %s %s%s -> %s in %.1f ms",
            call.call_id,
            request.method,
            "" if address else " (cast)",
            outcome,
            (monotonic() - started) * 1000,
        )
        if address is None:
            return None
        return self._encode_reply(address, body, serializer)

    def _answer(self, reply: _Reply | None) -> bool | int:
        """Publish ``reply``, if any; returns what :meth:`_publish_reply` returns."""
        return True if reply is None else self._publish_reply(reply)

    def _reply(self, address: protocol.ReplyAddress, body: dict[str, Any], serializer: str) -> bool | int:
        """Publish a reply; see :meth:`_publish_reply`."""
        return self._publish_reply(self._encode_reply(address, body, serializer))

    def _encode_reply(self, address: protocol.ReplyAddress, body: dict[str, Any], serializer: str) -> _Reply:
        try:
            encoded, headers = self.codec.encode_reply(body, serializer)
        except SerializationError as exc:
            unserializable = RemoteError("UnserializableResult", f"the result cannot be serialized: {exc}")
            encoded, headers = self.codec.encode_reply(protocol.error_body(unserializable), serializer)
        headers = {**headers, protocol.SERVER_ID_HEADER: self.server_id}
        if self._secret is not None:
            headers.update(
                protocol.signature_headers(self._secret, "reply", encoded, address.correlation_id, "", None)
            )
        return _Reply(address, encoded, headers)

    def _publish_reply(self, reply: _Reply) -> bool | int:
        """Publish a reply; returns False when the broker did not take it, or the
        delivery tag of a reply whose confirm is still to come (see
        :meth:`_settle_message`)."""
        address, encoded, headers = reply.address, reply.encoded, reply.headers
        channel_producer = self._channel_producer
        on_channel = channel_producer is not None and threading.get_ident() == self._consuming_thread
        try:
            if on_channel:  # a lost connection is the consume loop's to handle: no retry
                assert channel_producer is not None
                _publish_reply_on(channel_producer.channel, address, encoded, headers)
            else:
                publish(
                    self._worker_producer(),
                    self._retry_policy,
                    body=encoded.payload,
                    exchange="",
                    routing_key=address.reply_to,
                    correlation_id=address.correlation_id,
                    headers=headers,
                    content_type=encoded.content_type,
                    content_encoding=encoded.content_encoding,
                    timeout=PUBLISH_TIMEOUT,  # py-amqp also bounds the wait for the confirm by it
                )
        except Exception as exc:
            logger.error("could not publish the reply to %s: %s", address.reply_to, exc)
            return False
        if on_channel and self._confirming:
            self._reply_tag += 1
            return self._reply_tag
        return True

    def _worker_producer(self) -> Producer:
        """This worker thread's reply producer, on a connection of its own made on its
        first reply (the consuming thread replies on the channel it consumes from)."""
        producer: Producer | None = getattr(self._local, "producer", None)
        if producer is None:
            conn = publishing_clone(self._connection, self.confirm_publish)
            producer = self._local.producer = Producer(conn, auto_declare=False)
            with self._producers_lock:
                self._producers.append(producer)
        return producer

    def _check_signature(self, message: Message, secret: bytes) -> None:
        protocol.check_signature(message, secret, self.signature_window)
        signature = message.headers[protocol.SIGNATURE_HEADER]
        now = monotonic()
        seen = self._seen_signatures
        while seen and next(iter(seen.values())) < now:
            seen.popitem(last=False)
        if signature in seen and not (message.delivery_info or {}).get("redelivered"):
            raise MalformedRequest("InvalidSignature", "the request was already received (a replay)")
        seen[signature] = now + 2 * self.signature_window

    # -- built-in methods and the event loop for async def functions -------------------

    def _ping(self) -> dict[str, Any]:
        """Identify this server."""
        return {
            "server_id": self.server_id,
            "queue": self.queue,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
        }

    def _describe(self) -> list[dict[str, str]]:
        """List the methods this server exposes."""
        return [p.describe() for p in [*self.registry, *self._builtins.values()]]

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(
                    target=_run_loop, args=(loop,), name="kombu_rpc-asyncio", daemon=True
                ).start()
                self._loop = loop
            return self._loop

    def _stop_loop(self) -> None:
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)

    # -- acks (only from the consuming thread) ----------------------------------------

    def _settle(self) -> None:
        while self._done:
            with self._cond:
                message, generation, outcome = self._done.popleft()
                self._in_flight -= 1
            if isinstance(outcome, _Reply):  # sent even if the request's channel is gone
                outcome = self._publish_reply(outcome)
            if generation == self._generation:
                self._settle_message(message, outcome)

    def _settle_message(self, message: Message, ok: bool | int) -> None:
        """Ack a handled request, or requeue it when its reply could not be sent; a
        reply's delivery tag for ``ok`` defers the ack until the broker confirms it."""
        if ok is not True and ok is not False:
            self._unconfirmed[ok] = message
            return
        try:
            if ok:
                message.ack()
            else:
                message.requeue()
        except self._connection_errors as exc:
            # The first sign of a lost connection may come here: let the consume loop
            # reconnect (the broker redelivers the request) instead of polling on.
            logger.warning("could not settle a request: %s", exc)
            raise
        except Exception as exc:  # the channel died; the broker redelivers
            logger.warning("could not settle a request: %s", exc)


def _publish_reply_on(
    channel: Any, address: protocol.ReplyAddress, encoded: protocol.Encoded, headers: dict[str, Any]
) -> None:
    """Publish a reply on ``channel``: the message ``Producer(channel).publish(...)``
    sends with the keywords of the worker threads' replies (``exchange=""``, persistent
    as kombu's default exchange makes it), without the steps a reply never takes
    (serializing, compressing, declaring, retrying, batching), which cost as much per
    reply as building and sending the message."""
    body, content_encoding = encoded.payload, encoded.content_encoding
    if isinstance(body, str):  # as Producer._prepare does
        content_encoding = content_encoding or "utf-8"
        body = body.encode(content_encoding)
    elif not content_encoding:
        content_encoding = "binary"
    properties = {"correlation_id": address.correlation_id, "delivery_mode": PERSISTENT_DELIVERY_MODE}
    message = channel.prepare_message(body, 0, encoded.content_type, content_encoding, headers, properties)
    channel.basic_publish(
        message,
        exchange="",
        routing_key=address.reply_to,
        mandatory=False,
        immediate=False,
        timeout=PUBLISH_TIMEOUT,  # py-amqp also bounds the wait for the confirm by it
    )


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_forever()
    finally:
        loop.close()


class _Stopped(Exception):
    """Raised inside reconnect retries to abandon them once stop() was called."""
