"""RPCServer: consume -> validate -> run -> reply -> ack.

:class:`RPCServer` is a facade over the server's parts, each in a module of its own:
the dispatcher (``kombu_rpc._dispatch``: decode, verify, look up, check, run, encode;
no I/O), the execution policy (``kombu_rpc._execution``: inline, a thread pool, an
asyncio loop), the consume loop (``kombu_rpc._consumer``: connect, declare, consume,
reconnect) and the reply publisher (``kombu_rpc._replies``: publish a reply, then
ack, requeue, or ack once the broker confirmed it).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from . import protocol
from ._cancels import CancelledCalls
from ._consumer import ConsumeLoop
from ._dispatch import Dispatcher
from ._execution import EventLoop
from .codecs import Codec
from .connection import Broker, connect
from .errors import ConnectionLostError
from .options import ServerOptions
from .registry import Registry
from .topology import DEFAULT_QUEUE, new_id

logger = logging.getLogger(__name__)


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
        concurrency: How many calls run at once. With 1, calls run in the consuming
            thread; above 1, in a thread pool.
        prefetch_multiplier: How many requests the server takes from the broker
            ahead of running them, per call it can run (Celery's
            ``worker_prefetch_multiplier``): the prefetch count is ``concurrency *
            prefetch_multiplier``. Above 1 the next request is at hand when a call
            ends (no broker round trip between calls), but the requests a busy server
            holds wait for it even if another server of the queue is idle; see
            :doc:`/guide` ("Concurrency and acknowledgements").
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
        prefetch_multiplier: int = 1,
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
            prefetch_multiplier=prefetch_multiplier,
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
        self.prefetch_multiplier = options.prefetch_multiplier
        self.accept = frozenset(options.accept)
        self.send_tracebacks = options.send_tracebacks
        self.max_message_size = options.max_message_size
        self.durable = options.durable
        self.queue_type = options.queue_type
        self.queue_arguments = options.queue_arguments
        self.confirm_publish = options.confirm_publish
        self.codec: Codec = options.codec
        #: Unique id of this server; names its private control queue.
        self.server_id = new_id()
        self._connection = connect(broker)
        retry_policy = dict(options.retry_policy or {})
        event_loop = EventLoop()  # for async def functions, started on first use
        self._dispatcher = Dispatcher(
            self.registry,
            self.codec,
            self.server_id,
            self.queue,
            accept=self.accept,
            send_tracebacks=self.send_tracebacks,
            max_message_size=self.max_message_size,
            secret=protocol.secret_bytes(options.secret),
            signature_window=self.signature_window,
            run_coroutine=event_loop.run,
            cancels=CancelledCalls(on_cancel=event_loop.cancel),
        )
        self._consumer = ConsumeLoop(
            self._connection,
            self._dispatcher,
            self,
            concurrency=self.concurrency,
            prefetch_count=self.concurrency * self.prefetch_multiplier,
            durable=self.durable,
            queue_arguments=self.queue_arguments,
            retry_policy=retry_policy,
            confirm_publish=self.confirm_publish,
            event_loop=event_loop,
        )

    # -- lifecycle -------------------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`stop`, SIGINT or SIGTERM; then stop gracefully.

        Signal handlers are installed only when called from the main thread.

        Raises:
            ConnectionLostError: The broker could not be reached at start.
        """
        self._consumer.stopping.clear()
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
        self._consumer.stopping.clear()
        started = self._consumer.started
        failure: list[BaseException] = []

        def target() -> None:
            try:
                self._serve()
            except BaseException as exc:
                failure.append(exc)
            finally:
                started.set()

        started.clear()
        thread = threading.Thread(target=target, name=f"kombu_rpc-server-{self.queue}", daemon=True)
        thread.start()
        try:
            if not started.wait(self.startup_timeout):
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
        self._consumer.stop()

    @property
    def ready(self) -> bool:
        """True while the server is consuming its queue."""
        return self._consumer.ready.is_set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        logger.info("received signal %s, stopping gracefully", signum)
        self.stop()

    def _serve(self) -> None:
        self._dispatcher.signature_window = self.signature_window  # a class attribute: may be set later
        self._consumer.serve()
