"""The calling side's machinery: pending calls, the reply listener and the publisher.

:class:`Client` owns two connections: one for publishing requests (shared by all
calling threads under a lock) and one owned by the reply-listener thread, which
consumes the proxy's reply queue and completes futures by correlation id.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from time import monotonic
from typing import Any

from kombu import Connection, Consumer, Producer
from kombu.exceptions import OperationalError
from kombu.message import Message

from . import protocol
from .connection import publishing_clone, reconnect
from .errors import CallError, ConnectionLostError, NoServerError, RemoteError, RPCError, RPCTimeout
from .topology import REPLY_QUEUE_TEMPLATE, discard_queue, new_id, private_queue

logger = logging.getLogger(__name__)

#: AMQP reply code of a ``basic.return`` for a message no queue is bound to take.
NO_ROUTE = 312
#: Longest time the listener blocks in ``drain_events`` (for heartbeats).
IDLE_WAIT = 1.0


@dataclass
class _Pending:
    future: Future[Any]
    method: str
    timeout: float | None


class PendingCalls:
    """Calls waiting for a reply, by correlation id, each failed at its deadline.

    Whoever pops an entry completes its future, so a reply and a timeout racing
    for the same call cannot both win. A small thread fails expired calls with
    :class:`RPCTimeout`; it sleeps on a condition until the earliest deadline.
    """

    def __init__(self) -> None:
        self._calls: dict[str, _Pending] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._watcher: threading.Thread | None = None

    def add(self, correlation_id: str, method: str, timeout: float | None) -> Future[Any]:
        """Register a call before its request is published; returns its future."""
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()  # a sent request cannot be cancelled
        with self._cond:
            self._calls[correlation_id] = _Pending(future, method, timeout)
            if timeout is not None:
                deadline = monotonic() + timeout
                heapq.heappush(self._deadlines, (deadline, correlation_id))
                if self._deadlines[0][1] == correlation_id:
                    self._cond.notify()
                if self._watcher is None:
                    self._watcher = threading.Thread(
                        target=self._watch, name="kombu_rpc-deadlines", daemon=True
                    )
                    self._watcher.start()
        return future

    def pop(self, correlation_id: str) -> _Pending | None:
        """Remove and return the call, or ``None`` if it is unknown or already done."""
        with self._cond:
            return self._calls.pop(correlation_id, None)

    def fail_all(self, exc_factory: type[RPCError], message: str) -> None:
        """Fail every pending call with ``exc_factory(message)``."""
        with self._cond:
            calls, self._calls = self._calls, {}
        for pending in calls.values():
            pending.future.set_exception(exc_factory(f"{message} (call to {pending.method!r})"))

    def close(self) -> None:
        """Stop the deadline thread (pending calls are left to :meth:`fail_all`)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join()

    def __len__(self) -> int:
        return len(self._calls)

    def _watch(self) -> None:
        while True:
            expired: list[_Pending] = []
            with self._cond:
                if self._closed:
                    return
                now = monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    _, cid = heapq.heappop(self._deadlines)
                    pending = self._calls.pop(cid, None)
                    if pending is not None:
                        expired.append(pending)
                if not expired:
                    wait = self._deadlines[0][0] - now if self._deadlines else None
                    self._cond.wait(wait)
            for pending in expired:
                assert pending.timeout is not None
                pending.future.set_exception(RPCTimeout(pending.method, pending.timeout))


class Client:
    """Sends requests and routes replies for one :class:`~kombu_rpc.RPCProxy`.

    Args:
        connection: A connection from :func:`kombu_rpc.connection.connect`; the
            client clones it and never uses it directly.
        serializer: Serializer name for requests.
        retry_policy: Keywords for kombu's ``ensure_connection`` and
            ``publish(retry_policy=...)``.
        confirm_publish: On AMQP, publish requests with publisher confirms and
            ``mandatory``, so an unroutable request raises :class:`NoServerError`.
        secret: Sign every request with this HMAC key (see
            :func:`kombu_rpc.protocol.check_signature`).
    """

    def __init__(
        self,
        connection: Connection,
        serializer: str,
        retry_policy: dict[str, Any],
        confirm_publish: bool = True,
        secret: bytes | None = None,
    ) -> None:
        self._connection = connection
        self._confirm_publish = confirm_publish
        self._secret = secret
        self.serializer = serializer
        self._accept = {serializer, "json"}
        self._retry_policy = retry_policy
        self.reply_queue = REPLY_QUEUE_TEMPLATE.format(uid=new_id())
        self._pending = PendingCalls()
        self._lock = threading.Lock()  # guards starting, closing and the publisher
        self._producer: Producer | None = None
        self._listener: threading.Thread | None = None
        self._listener_error: BaseException | None = None
        self._ready = threading.Event()
        self._closing = False

    # -- public --------------------------------------------------------------------

    def call(
        self, queue: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Future[Any]:
        """Publish a request and return the future of its result."""
        correlation_id = new_id()
        encoded, headers = self._request(method, args, kwargs, correlation_id, self.reply_queue, timeout)
        with self._lock:
            self._start()
            future = self._pending.add(correlation_id, method, timeout)
            try:
                self._publish(
                    encoded,
                    queue,
                    headers,
                    reply_to=self.reply_queue,
                    correlation_id=correlation_id,
                    expiration=timeout,
                )
            except BaseException:
                self._pending.pop(correlation_id)
                raise
        return future

    def cast(self, queue: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Publish a request that asks for no reply."""
        correlation_id = new_id()
        encoded, headers = self._request(method, args, kwargs, correlation_id, "", None)
        with self._lock:
            self._start()
            self._publish(encoded, queue, headers, correlation_id=correlation_id)

    def close(self) -> None:
        """Stop the listener, delete the reply queue, fail calls still pending."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            listener = self._listener
            if listener is not None and listener.is_alive():
                try:  # wake the listener out of drain_events
                    self._publish(protocol.WAKE_UP, self.reply_queue, dict(protocol.WAKE_HEADERS))
                except RPCError:
                    logger.warning("could not wake the reply listener; it stops within %ss", IDLE_WAIT)
            if self._producer is not None:
                self._producer.connection.release()
                self._producer = None
        if listener is not None:
            listener.join()
        self._pending.fail_all(CallError, "proxy closed before the reply arrived")
        self._pending.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closing

    # -- publishing ----------------------------------------------------------------

    def _request(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        correlation_id: str,
        reply_to: str,
        timeout: float | None,
    ) -> tuple[protocol.Encoded, dict[str, Any]]:
        """Encode a request body and build its headers: deadline, and signature if any."""
        encoded = protocol.encode(protocol.request_body(method, args, kwargs), self.serializer)
        deadline = protocol.deadline_after(timeout)
        headers: dict[str, Any] = {} if deadline is None else {protocol.DEADLINE_HEADER: deadline}
        if self._secret is not None:
            payload = encoded.payload
            body = payload.encode(encoded.content_encoding) if isinstance(payload, str) else payload
            signed_at = time.time()
            text = protocol.signed_text(
                body, encoded.content_type, correlation_id, reply_to, deadline, signed_at
            )
            headers[protocol.SIGNED_AT_HEADER] = signed_at
            headers[protocol.SIGNATURE_HEADER] = protocol.sign(self._secret, text)
        return encoded, headers

    def _start(self) -> None:
        """Start the reply listener and the publisher; called under ``self._lock``."""
        if self._closing:
            raise CallError("the proxy is closed")
        if self._listener is not None and self._listener.is_alive():
            return
        self._ready.clear()
        self._listener_error = None
        self._listener = threading.Thread(target=self._listen, name="kombu_rpc-replies", daemon=True)
        self._listener.start()
        self._ready.wait()
        if self._listener_error is not None:
            raise ConnectionLostError(
                f"cannot consume replies from {self._connection.as_uri()}: {self._listener_error}"
            ) from self._listener_error
        if self._producer is None:
            conn = publishing_clone(self._connection, self._confirm_publish)
            self._producer = Producer(conn, auto_declare=False)

    def _publish(
        self, encoded: protocol.Encoded, queue: str, headers: dict[str, Any], **properties: Any
    ) -> None:
        assert self._producer is not None
        try:
            self._producer.publish(
                encoded.payload,
                exchange="",
                routing_key=queue,
                headers=headers,
                content_type=encoded.content_type,
                content_encoding=encoded.content_encoding,
                retry=True,
                retry_policy=self._retry_policy,
                mandatory=self._confirm_publish,
                **properties,
            )
        except self._producer.connection.channel_errors as exc:
            if getattr(exc, "reply_code", None) == NO_ROUTE:
                raise NoServerError(f"no queue {queue!r} on the broker: is a server running?") from None
            raise ConnectionLostError(f"cannot publish to {queue!r}: {exc}") from exc
        except (*self._producer.connection.connection_errors, OperationalError, OSError) as exc:
            raise ConnectionLostError(f"cannot publish to {queue!r}: {exc}") from exc

    # -- the listener thread ---------------------------------------------------------

    def _listen(self) -> None:
        conn = self._connection.clone()
        try:
            conn.ensure_connection(**self._retry_policy)
            consumer = self._consume_replies(conn)
        except Exception as exc:  # reported to the caller by _start
            self._listener_error = exc
            self._ready.set()
            conn.release()
            return
        self._ready.set()
        try:
            while not self._closing:
                try:
                    conn.heartbeat_check()
                    conn.drain_events(timeout=IDLE_WAIT)
                except TimeoutError:
                    pass
                except conn.connection_errors as exc:
                    consumer = self._reconnect(conn, exc)
        except _Closed:
            return
        finally:
            try:
                consumer.cancel()
            except conn.connection_errors + conn.channel_errors:
                pass
            for queue in consumer.queues:
                discard_queue(queue)
            conn.release()

    def _consume_replies(self, conn: Connection) -> Consumer:
        """Declare the reply queue on a fresh channel and consume it."""
        channel = conn.channel()
        queue = private_queue(self.reply_queue)(channel)
        queue.declare()
        consumer = Consumer(channel, [queue], on_message=self._on_reply, no_ack=True, accept=self._accept)
        consumer.on_decode_error = self._on_reply
        consumer.consume()
        return consumer

    def _reconnect(self, conn: Connection, exc: Exception) -> Consumer:
        """Reconnect (until closed) and consume the re-declared reply queue again.

        Pending calls stay pending: their replies still arrive if the reply queue
        survived (Redis) or was declared again before the server answered; the others
        end in :class:`RPCTimeout` at their deadline.
        """
        logger.warning("reply listener lost its connection (%s); reconnecting", exc)
        while True:
            try:
                reconnect(conn, self._retry_policy, self._check_closing)
                return self._consume_replies(conn)
            except conn.connection_errors as again:
                logger.warning("reply listener lost its connection again (%s)", again)

    def _check_closing(self) -> None:
        if self._closing:
            raise _Closed()

    def _on_reply(self, message: Message, decode_error: Exception | None = None) -> None:
        correlation_id = (message.properties or {}).get("correlation_id")
        if not isinstance(correlation_id, str):
            if protocol.CONTROL_HEADER not in (message.headers or {}):
                logger.warning("dropped a reply without correlation_id on %s", self.reply_queue)
            return
        pending = self._pending.pop(correlation_id)
        if pending is None:
            logger.warning("dropped a late or duplicate reply %s", correlation_id)
            return
        try:
            if decode_error is not None:
                raise decode_error
            result = protocol.parse_reply(message.decode())
        except RemoteError as exc:
            pending.future.set_exception(exc)
        except Exception as exc:  # an undecodable reply still ends its call
            pending.future.set_exception(RemoteError("MalformedReply", f"reply could not be decoded: {exc}"))
        else:
            pending.future.set_result(result)


class _Closed(Exception):
    """Raised inside reconnect retries to abandon them once the proxy closes."""
