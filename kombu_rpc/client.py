"""The calling side's machinery: pending calls, replies, and how requests are published.

Replies are read through a link (see :mod:`kombu_rpc.link`): the waiting callers read
the reply queue themselves, in turn, and the link's thread reads for calls nobody waits
on. On RabbitMQ, ``AmqpLink`` also publishes the requests, from the calling threads, on
the connection it reads. On memory://, callers publish inline (a put cannot stall). On
Redis and the polling transports, a publisher thread with a connection of its own
publishes the requests that callers queue for it, in order: a publish there waits for
the broker's answer, which a stalled connection can hold back until the socket timeout.
Either way no broker I/O ever blocks a caller past its deadline.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from queue import SimpleQueue
from time import monotonic
from typing import Any

from kombu import Connection, Exchange, Producer
from kombu.exceptions import OperationalError
from kombu.message import Message

from . import context, protocol
from .codecs import Codec, Plain, check_codec
from .connection import PUBLISH_TIMEOUT, publish, publishing_clone, safe_uri
from .errors import (
    CallError,
    ConfigurationError,
    ConnectionLostError,
    NoServerError,
    RemoteError,
    RPCError,
    RPCTimeout,
)
from .link import AmqpLink, MemoryLink, PollingLink, RedisLink
from .topology import DIRECT_REPLY_TO, REPLY_QUEUE_TEMPLATE, broadcast_exchange, new_id
from .transports import Kind, kind

logger = logging.getLogger(__name__)

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


@dataclass
class _Pending:
    future: Future[Any]
    method: str
    timeout: float | None
    span: Any = None  # the call's OpenTelemetry span, ended before the future completes
    queue: str = ""  # where its request went
    job: _Outgoing | None = None  # its request (AMQP: published again after a lost reply queue)

    def resolve(self, result: Any) -> None:
        context.end_span(self.span)
        self.future.set_result(result)

    def reject(self, error: BaseException) -> None:
        context.end_span(self.span, error)
        self.future.set_exception(error)


@dataclass(frozen=True)
class BroadcastReply:
    """One server's answer to a broadcast (see :meth:`kombu_rpc.proxy.MethodProxy.broadcast`).

    Attributes:
        server_id: The answering server's :attr:`~kombu_rpc.server.RPCServer.server_id`
            (empty if the reply did not name one).
        result: The function's result on that server, if it succeeded.
        error: What the server answered instead, if it failed.
    """

    server_id: str
    result: Any = None
    error: RemoteError | None = None

    @property
    def ok(self) -> bool:
        """True when the function succeeded on this server."""
        return self.error is None

    def get(self) -> Any:
        """Return the result, or raise the server's :class:`RemoteError`."""
        if self.error is not None:
            raise self.error
        return self.result


class _Gathering:
    """The replies to one broadcast, collected as they arrive."""

    def __init__(self, expect: int | None) -> None:
        self.replies: list[BroadcastReply] = []
        self._expect = expect
        self._cond = threading.Condition()

    def add(self, reply: BroadcastReply) -> None:
        with self._cond:
            self.replies.append(reply)
            self._cond.notify_all()

    def complete(self) -> bool:
        """True once ``expect`` replies arrived."""
        return self._expect is not None and len(self.replies) >= self._expect

    def wait(self, deadline: float) -> list[BroadcastReply]:
        """Wait until ``expect`` replies arrived or the (monotonic) deadline passed."""
        with self._cond:
            self._cond.wait_for(self.complete, max(0.0, deadline - monotonic()))
            return list(self.replies)


@dataclass
class _Outgoing:
    """A request waiting for the publisher thread.

    A call's request carries its ``correlation_id`` (its pending entry is its state);
    a cast's carries the ``sent`` future its caller waits on.
    """

    encoded: protocol.Encoded
    queue: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    deadline: float | None  # monotonic
    correlation_id: str | None = None
    sent: Future[None] | None = field(default=None)
    exchange: Exchange | None = None  # None: the default exchange, routed by queue name
    #: The caller marked the call safe to run twice (``retry=True``): published again
    #: when its reply can no longer arrive.
    retry: bool = False
    #: The key it is signed with, to sign it again for a new reply queue.
    secret: bytes | None = None
    #: Written to a connection (AMQP), which may have handed it to a server.
    written: bool = False
    #: Times the broker refused it (AMQP nacks).
    nacks: int = 0

    def claim(self, pending: PendingCalls) -> bool:
        """True if the request should still be published now."""
        if self.sent is not None:
            return self.sent.set_running_or_notify_cancel()
        return self.correlation_id is None or self.correlation_id in pending

    def wanted(self, pending: PendingCalls) -> bool:
        """True if a claimed request whose publish may have been lost should go again."""
        if self.sent is not None:
            return not self.sent.done()
        return self.correlation_id is None or self.correlation_id in pending

    def publish_args(self, mandatory: bool) -> dict[str, Any]:
        """The keywords of ``Producer.publish`` for this request, its socket writes
        bounded by :meth:`publish_timeout`."""
        return {
            "body": self.encoded.payload,
            "exchange": self.exchange or "",
            "declare": [self.exchange] if self.exchange else None,
            "routing_key": "" if self.exchange else self.queue,
            "headers": self.headers,
            "content_type": self.encoded.content_type,
            "content_encoding": self.encoded.content_encoding,
            "mandatory": mandatory,
            "timeout": self.publish_timeout(),
            **self.properties,
        }

    def readdress(self, reply_to: str) -> None:
        """Have the reply go to ``reply_to`` (a new reply queue), signed again if signed."""
        self.properties = {**self.properties, "reply_to": reply_to}
        if self.secret is not None:
            assert self.correlation_id is not None
            self.headers = {
                **self.headers,
                **protocol.signature_headers(
                    self.secret,
                    "request",
                    self.encoded,
                    self.correlation_id,
                    reply_to,
                    self.headers.get(protocol.DEADLINE_HEADER),
                ),
            }

    def publish_timeout(self) -> float:
        """How long publishing may block: until the deadline, at most PUBLISH_TIMEOUT."""
        if self.deadline is None:
            return PUBLISH_TIMEOUT
        return max(0.001, min(PUBLISH_TIMEOUT, self.deadline - monotonic()))

    def done(self) -> None:
        if self.sent is not None and not self.sent.done():  # a returned cast failed already
            self.sent.set_result(None)

    def fail(self, pending: PendingCalls, exc: RPCError) -> None:
        if self.sent is not None:
            if not self.sent.done():
                self.sent.set_exception(exc)
        elif self.correlation_id is not None:
            entry = pending.pop(self.correlation_id)
            if entry is not None:
                entry.reject(exc)
            else:
                logger.warning("could not publish an expired request to %r: %s", self.queue, exc)
        else:
            logger.warning("could not publish to %r: %s", self.queue, exc)


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


class PendingCalls:
    """Calls waiting for a reply, by correlation id, each failed at its deadline.

    Whoever pops an entry completes its future, so a reply and a timeout racing
    for the same call cannot both win. A small thread fails expired calls with
    :class:`RPCTimeout`; it sleeps on a condition until the earliest deadline.
    """

    def __init__(self, on_expired: Callable[[str, str], None] | None = None) -> None:
        #: Called with (queue, correlation_id) of each call failed at its deadline.
        self._on_expired = on_expired
        self._calls: dict[str, _Pending] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._watcher: threading.Thread | None = None
        #: The latest (monotonic) deadline of the calls and broadcasts that ended
        #: without (all) their replies: those replies may still come.
        self._unanswered_until = -math.inf

    def add(
        self,
        correlation_id: str,
        method: str,
        timeout: float | None,
        span: Any = None,
        queue: str = "",
        job: _Outgoing | None = None,
    ) -> Future[Any]:
        """Register a call before its request is published; returns its future."""
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()  # a sent request cannot be cancelled
        with self._cond:
            self._calls[correlation_id] = _Pending(future, method, timeout, span, queue, job)
            if timeout is not None:
                deadline = monotonic() + timeout
                if len(self._deadlines) > 2 * len(self._calls) + 1024:
                    self._compact()
                heapq.heappush(self._deadlines, (deadline, correlation_id))
                if self._deadlines[0][1] == correlation_id:
                    self._cond.notify()
                if self._watcher is None:
                    self._watcher = threading.Thread(
                        target=self._watch, name="kombu_rpc-deadlines", daemon=True
                    )
                    self._watcher.start()
        return future

    def _compact(self) -> None:
        """Drop the deadlines of calls that already ended (under ``self._cond``).

        A finished call leaves its deadline in the heap until it comes due; without
        this, a proxy making 1,000 calls/s with a 30 s timeout would hold 30,000 of them.
        """
        self._deadlines = [entry for entry in self._deadlines if entry[1] in self._calls]
        heapq.heapify(self._deadlines)

    def pop(self, correlation_id: str) -> _Pending | None:
        """Remove and return the call, or ``None`` if it is unknown or already done."""
        with self._cond:
            return self._calls.pop(correlation_id, None)

    def fail_all(self, exc_factory: type[RPCError], message: str) -> list[tuple[str, str]]:
        """Fail every pending call with ``exc_factory(message)``; returns their
        (queue, correlation_id)."""
        with self._cond:
            calls, self._calls = self._calls, {}
        for pending in calls.values():
            pending.reject(exc_factory(f"{message} (call to {pending.method!r})"))
        return [(pending.queue, cid) for cid, pending in calls.items()]

    def lose_replies(self) -> list[_Outgoing]:
        """The reply queue is gone (AMQP, with its connection): fail each call whose
        request was written, as it may have run, unless marked ``retry``; return the
        requests of those to publish again."""
        again: list[_Outgoing] = []
        lost: list[_Pending] = []
        with self._cond:
            for cid, pending in list(self._calls.items()):
                job = pending.job
                if job is None or not job.written:
                    continue  # not sent yet: it goes to the new reply queue
                job.written = False
                if job.retry:
                    again.append(job)
                else:
                    lost.append(self._calls.pop(cid))
        for pending in lost:
            pending.reject(
                ConnectionLostError(
                    f"the connection to the broker was lost while call {pending.method!r} was in "
                    "flight; its reply can no longer arrive, and the request may have run "
                    "(pass retry=True for calls safe to run twice)"
                )
            )
        return again

    def unanswered(self, deadline: float) -> None:
        """Note a call or broadcast that ended at (monotonic) ``deadline`` without (all)
        its replies: servers may still send them."""
        with self._cond:
            self._unanswered_until = max(self._unanswered_until, deadline)

    def last_deadline(self) -> float:
        """The latest (monotonic) deadline of the calls in flight and of those noted by
        :meth:`unanswered`, after which no reply is due any more: ``math.inf`` if a call
        in flight has no deadline, ``-math.inf`` if no reply can come."""
        with self._cond:
            if any(pending.timeout is None for pending in self._calls.values()):
                return math.inf
            in_flight = [deadline for deadline, cid in self._deadlines if cid in self._calls]
            return max([self._unanswered_until, *in_flight])

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

    def __contains__(self, correlation_id: object) -> bool:
        return correlation_id in self._calls

    def _watch(self) -> None:
        while True:
            expired: list[tuple[str, _Pending]] = []
            with self._cond:
                if self._closed:
                    return
                now = monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    _, cid = heapq.heappop(self._deadlines)
                    pending = self._calls.pop(cid, None)
                    if pending is not None:
                        expired.append((cid, pending))
                if expired:
                    self._unanswered_until = max(self._unanswered_until, now)
                else:
                    wait = self._deadlines[0][0] - now if self._deadlines else None
                    self._cond.wait(wait)
            for cid, pending in expired:
                assert pending.timeout is not None
                pending.reject(RPCTimeout(pending.method, pending.timeout))
                if self._on_expired is not None:
                    self._on_expired(pending.queue, cid)


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
        secret: Sign every request with this HMAC key, and accept only replies signed
            with it (see :func:`kombu_rpc.protocol.check_signature`).
        codec: The wire format (:mod:`kombu_rpc.codecs`); ``None``: the default.
        direct_reply_to: On RabbitMQ, take replies through the ``amq.rabbitmq.reply-to``
            pseudo-queue instead of a declared reply queue; replies to calls in flight
            are lost if the connection drops.
    """

    def __init__(
        self,
        connection: Connection,
        serializer: str,
        retry_policy: dict[str, Any],
        confirm_publish: bool = True,
        secret: bytes | None = None,
        codec: Codec | None = None,
        direct_reply_to: bool = False,
    ) -> None:
        self._kind = kind(connection)
        if direct_reply_to and self._kind is not Kind.AMQP:
            raise ConfigurationError("direct_reply_to is a RabbitMQ feature: it needs an amqp:// broker")
        self._direct = direct_reply_to
        self._connection = connection
        self._codec = check_codec(codec)
        self._confirm_publish = confirm_publish
        self._secret = secret
        self.serializer = serializer
        self._accept = {serializer, "json"}
        self._retry_policy = retry_policy
        self._closing = False
        self._fresh_state()

    def _fresh_state(self) -> None:
        """Per-process state: a forked child starts over with a reply queue of its own
        (the parent's threads did not survive the fork, and on AMQP its exclusive reply
        queue belongs to the parent's connection)."""
        self._pid = os.getpid()
        reply_queue = DIRECT_REPLY_TO if self._direct else REPLY_QUEUE_TEMPLATE.format(uid=new_id())
        self._pending = PendingCalls(self._withdraw if self._kind is Kind.REDIS else None)
        self._lock = threading.Lock()  # guards starting and closing
        self._link: AmqpLink | MemoryLink | PollingLink
        self._link_started = False
        link_args = (
            self._connection,
            reply_queue,
            self._retry_policy,
            self._pending,
            self._on_reply,
            self._accept,
        )
        if self._kind is Kind.AMQP:
            self._link = AmqpLink(*link_args, confirm=self._confirm_publish)
        elif self._kind is Kind.MEMORY:
            self._link = MemoryLink(*link_args)
        elif self._kind is Kind.REDIS:
            self._link = RedisLink(*link_args)
        else:
            self._link = PollingLink(*link_args)
        self._outbox: SimpleQueue[_Outgoing | _Withdrawal | None] = SimpleQueue()
        self._broadcasts: dict[str, _Gathering] = {}
        self._publisher: threading.Thread | None = None
        self._producer: Producer | None = None  # the inline publisher's
        self._inline_lock = threading.Lock()

    @property
    def reply_queue(self) -> str:
        """The reply queue's name. On AMQP a new one replaces it after a lost
        connection: the old one went with the connection."""
        return self._link.reply_queue

    @property
    def _threaded(self) -> bool:
        """True if requests go through the publisher thread (a publish may block past
        a caller's deadline: Redis and polling transports), not through the AMQP link
        or inline (memory://, where a put cannot stall)."""
        return self._kind is Kind.REDIS or self._kind is Kind.POLLING

    # -- public --------------------------------------------------------------------

    def call(
        self,
        queue: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        attended: bool = False,
        retry: bool = False,
    ) -> Future[Any]:
        """Send a request (or queue it for publishing) and return the future of its result.

        The future fails with :class:`RPCTimeout` at the deadline even if the request
        could not be published by then (a stalled connection), and with
        :class:`NoServerError` or :class:`ConnectionLostError` if publishing failed,
        or if the reply can no longer arrive (on AMQP, the connection was lost) and
        not ``retry``. ``retry``: the call is safe to run twice, so it is published
        again instead. ``attended``: the caller goes on to wait in :meth:`wait`.
        """
        correlation_id = new_id()
        with context.client_span(method, queue, correlation_id) as span:
            try:
                encoded, headers = self._request(
                    method, args, kwargs, correlation_id, self.reply_queue, timeout
                )
                self._start()
            except BaseException as exc:
                context.end_span(span, exc)
                raise
        properties = {"reply_to": self.reply_queue, "correlation_id": correlation_id, "expiration": timeout}
        deadline = None if timeout is None else monotonic() + timeout
        job = _Outgoing(
            encoded, queue, headers, properties, deadline, correlation_id, retry=retry, secret=self._secret
        )
        future = self._pending.add(correlation_id, method, timeout, span, queue, job)
        self._submit(job, attended)
        return future

    def wait(self, future: Future[Any], timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds for a call to end (reading replies in this
        thread); the future holds its outcome, if it ended."""
        if not future.done():
            self._link.wait(future.done, timeout)

    def cast(self, queue: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Publish a request that asks for no reply; returns once the broker took it.

        Raises:
            NoServerError: On AMQP with confirms, no queue ``queue`` exists.
            ConnectionLostError: The request could not be published within
                :data:`~kombu_rpc.connection.PUBLISH_TIMEOUT`.
        """
        correlation_id = new_id()
        with context.traced_call(method, queue, correlation_id):
            encoded, headers = self._request(method, args, kwargs, correlation_id, "", None)
            self._start()
            sent: Future[None] = Future()
            self._submit(
                _Outgoing(encoded, queue, headers, {"correlation_id": correlation_id}, None, sent=sent),
                attended=True,
            )
            self._wait_sent(sent, PUBLISH_TIMEOUT, f"cast to {method!r}")

    def broadcast(
        self,
        queue: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float,
        expect: int | None,
    ) -> list[BroadcastReply]:
        """Send one request to every server of ``queue`` and gather their replies for
        ``timeout`` seconds, or until ``expect`` replies arrived.

        Raises:
            ConnectionLostError: The request could not be published in time.
        """
        correlation_id = new_id()
        deadline = monotonic() + timeout
        with context.traced_call(method, queue, correlation_id):
            encoded, headers = self._request(method, args, kwargs, correlation_id, self.reply_queue, timeout)
            self._start()
            exchange = broadcast_exchange(queue)
            if not self._may_exist(exchange, timeout):
                return []  # no server: declaring the exchange would only leave it behind
            gathering = self._broadcasts[correlation_id] = _Gathering(expect)
            sent: Future[None] = Future()
            properties = {
                "reply_to": self.reply_queue,
                "correlation_id": correlation_id,
                "expiration": timeout,
            }
            try:
                self._submit(
                    _Outgoing(encoded, queue, headers, properties, deadline, sent=sent, exchange=exchange),
                    attended=True,
                )
                self._wait_sent(sent, timeout, f"broadcast of {method!r}")
                self._link.wait(gathering.complete, deadline - monotonic())
                return gathering.wait(deadline)
            except NoServerError:  # AMQP: no server has bound a queue to the exchange
                return []
            finally:
                del self._broadcasts[correlation_id]
                self._pending.unanswered(deadline)  # more servers may answer still

    def _may_exist(self, exchange: Exchange, timeout: float) -> bool:
        """False if the broadcast ``exchange`` is sure not to exist on the broker.

        On RabbitMQ and memory://, a broadcast declares its exchange (auto-delete, as
        the servers bound to it declare it), and one declared with no server bound is
        never deleted: the broker deletes an auto-delete exchange only when its last
        queue is unbound. So a broadcast first asks, on a connection of its own, whether
        the exchange exists (a passive declare that fails closes its channel). Other
        transports keep no exchanges on the broker, and a failed check lets the
        broadcast go on: its publish reports what is wrong.
        """
        if self._kind is not Kind.AMQP and self._kind is not Kind.MEMORY:
            return True
        try:
            with self._connection.clone(connect_timeout=min(timeout, PUBLISH_TIMEOUT)) as conn:
                conn.connect()
                try:
                    exchange(conn.default_channel).declare(passive=True)
                except conn.channel_errors:
                    return False
        except Exception as exc:
            logger.debug("could not check the broadcast exchange %s: %s", exchange.name, exc)
        return True

    def close(self) -> None:
        """Stop the link and the publisher thread, delete the reply queue, fail calls
        still pending."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            publisher, link = self._publisher, self._link
        if self._link_started:
            link.close()
        withdrawn = self._pending.fail_all(CallError, "proxy closed before the reply arrived")
        if publisher is not None:
            for queue, correlation_id in withdrawn if self._kind is Kind.REDIS else ():
                self._withdraw(queue, correlation_id)
            self._outbox.put(None)
            publisher.join(PUBLISH_TIMEOUT)
            if publisher.is_alive():
                logger.warning("the publisher is stuck on a dead connection; leaving it behind")
        with self._inline_lock:
            if self._producer is not None:
                self._producer.connection.release()
                self._producer = None
        link.wake_waiters()
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
        encoded = self._codec.encode_request(method, args, kwargs, self.serializer)
        deadline = protocol.deadline_after(timeout)
        headers = context.outgoing_headers(correlation_id)
        if deadline is not None:
            headers[protocol.DEADLINE_HEADER] = deadline
        if self._secret is not None:
            headers.update(
                protocol.signature_headers(
                    self._secret, "request", encoded, correlation_id, reply_to, deadline
                )
            )
        return encoded, headers

    def _start(self) -> None:
        """Start the link, and on Redis the publisher thread, unless running."""
        if self._link_started and not self._closing and self._pid == os.getpid():
            return
        if self._pid != os.getpid():
            self._fresh_state()
        with self._lock:
            if self._closing:
                raise CallError("the proxy is closed")
            if self._link_started:
                return
            try:
                self._link.start()
            except Exception as exc:
                raise ConnectionLostError(f"cannot connect to {safe_uri(self._connection)}: {exc}") from exc
            self._link_started = True
            if self._threaded:
                self._publisher = threading.Thread(
                    target=self._publish_loop, name="kombu_rpc-publisher", daemon=True
                )
                self._publisher.start()

    # -- publishing, and the publisher thread ----------------------------------------------

    def _submit(self, job: _Outgoing, attended: bool) -> None:
        """Have ``job`` published: through the AMQP link, by the publisher thread (Redis),
        or right here on memory://, where a publish cannot stall (it saves a thread
        hand-off per call). ``attended``: the caller waits for the outcome itself."""
        if isinstance(self._link, AmqpLink):
            self._link.submit(job, attended)
            return
        if not self._threaded:
            with self._inline_lock:
                if self._producer is None:
                    self._producer = self._new_producer()
                self._send(self._producer, job)
        else:
            self._outbox.put(job)
        if not attended:
            self._link.unattended()

    def _withdraw(self, queue: str, correlation_id: str) -> None:
        """Have the publisher thread take back an unanswered request (Redis)."""
        if queue:
            self._outbox.put(_Withdrawal(queue, correlation_id))

    def _wait_sent(self, sent: Future[None], timeout: float, what: str) -> None:
        """Wait until a request was sent (confirmed on AMQP); raise what publishing raised.

        Raises:
            ConnectionLostError: Not sent within ``timeout`` (it is then never sent,
                unless its publish had already begun).
        """
        try:
            if self._threaded:  # the publisher thread sends it: no reading
                sent.result(timeout)
            else:
                self._link.wait(sent.done, timeout)
                sent.result(0)
        except FuturesTimeout:  # not the builtin TimeoutError before Python 3.11
            if sent.cancel():
                raise ConnectionLostError(
                    f"{what} not sent: the broker took no message for {timeout}s"
                ) from None
            raise ConnectionLostError(
                f"{what} may not have been sent: publishing it took over {timeout}s"
            ) from None

    def _new_producer(self) -> Producer:
        return Producer(publishing_clone(self._connection, self._confirm_publish), auto_declare=False)

    def _publish_loop(self) -> None:
        """Publish queued requests in order, skipping those whose caller gave up.

        Publishing runs here rather than in the calling thread so that a stalled
        connection, which can block a publish until its socket timeout, never holds a
        caller past its deadline: the caller waits on its future, which the deadline
        thread fails on time.
        """
        producer = self._new_producer()
        try:
            while (job := self._outbox.get()) is not None:
                if isinstance(job, _Withdrawal):
                    job.run(producer.channel)
                else:
                    self._send(producer, job)
        finally:
            producer.connection.release()

    def _send(self, producer: Producer, job: _Outgoing) -> None:
        """Publish one request unless its caller gave up, and report how it went."""
        if not job.claim(self._pending):
            return
        try:
            self._publish(producer, job)
        except RPCError as exc:
            job.fail(self._pending, exc)
        except Exception as exc:  # never let one request kill the publisher
            logger.exception("unexpected error publishing to %r", job.queue)
            job.fail(self._pending, ConnectionLostError(f"cannot publish to {job.queue!r}: {exc}"))
        else:
            job.done()

    def _publish(self, producer: Producer, job: _Outgoing) -> None:
        try:
            publish(producer, self._retry_policy, **job.publish_args(self._confirm_publish))
        except (
            *producer.connection.channel_errors,
            *producer.connection.connection_errors,
            OperationalError,
            OSError,
        ) as exc:
            raise ConnectionLostError(f"cannot publish to {job.queue!r}: {exc}") from exc

    # -- replies ---------------------------------------------------------------------

    def _on_reply(self, message: Message, decode_error: Exception | None = None) -> None:
        correlation_id = (message.properties or {}).get("correlation_id")
        if not isinstance(correlation_id, str):
            if protocol.CONTROL_HEADER not in (message.headers or {}):
                logger.warning("dropped a reply without correlation_id on %s", self.reply_queue)
            return
        gathering = self._broadcasts.get(correlation_id)
        if gathering is not None:
            server_id = str((message.headers or {}).get(protocol.SERVER_ID_HEADER, ""))
            try:
                gathering.add(BroadcastReply(server_id, self._read_reply(message, decode_error)))
            except RemoteError as exc:
                gathering.add(BroadcastReply(server_id, error=exc))
            return
        pending = self._pending.pop(correlation_id)
        if pending is None:
            logger.warning("dropped a late or duplicate reply %s", correlation_id)
            return
        try:
            result = self._read_reply(message, decode_error)
        except RemoteError as exc:
            pending.reject(exc.with_traceback(None))  # where its reply was read is no news
        else:
            pending.resolve(result)

    def _read_reply(self, message: Message, decode_error: Exception | None) -> Any:
        """The result a reply carries; raises :class:`RemoteError` for a failure or a
        reply that cannot be read (an undecodable reply still ends its call)."""
        try:
            if decode_error is not None:
                raise decode_error
            if self._secret is not None:
                protocol.check_signature(message, self._secret, protocol.SIGNATURE_WINDOW, "reply")
            return self._codec.decode_reply(message)
        except RemoteError:
            raise
        except Exception as exc:
            hint = ""
            if message.content_type == "text/plain" and not isinstance(self._codec, Plain):
                hint = "; the server answers in the plain format: call it with RPCProxy(..., codec=Plain())"
            raise RemoteError("MalformedReply", f"reply could not be decoded: {exc}{hint}") from exc
