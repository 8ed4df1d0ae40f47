"""The calling side's machinery: encoding requests, pending calls, broadcasts, and
routing the replies.

Requests are published and replies read through a link (see ``kombu_rpc._links``),
chosen once for the transport: the waiting callers read the reply queue themselves, in
turn, and the link's thread reads for calls nobody waits on. Either way no broker I/O
ever blocks a caller past its deadline.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass
from time import monotonic, time
from typing import Any

from kombu import Connection, Exchange
from kombu.message import Message

from . import context, metrics, protocol
from ._cancelling import CancelSender
from ._links import open_link
from ._pending import CallParts, PendingCalls, _Outgoing
from .codecs import Codec, Plain
from .connection import PUBLISH_TIMEOUT, broker_errors, safe_uri
from .errors import (
    CallError,
    ConnectionLostError,
    NoServerError,
    RemoteError,
)
from .options import ProxyOptions
from .topology import broadcast_exchange, new_id

logger = logging.getLogger("kombu_rpc.client")  # the name the guide documents
#: How many abandoned calls a client remembers, to drop their replies quietly.
_ABANDONED_KEPT = 1024


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


class Client:
    """Sends requests and routes replies for one :class:`~kombu_rpc.RPCProxy`.

    Args:
        connection: A connection from :func:`kombu_rpc.connection.connect`; the
            client clones it and never uses it directly.
        options: The proxy's settings; the client uses those of the connection and
            the wire: ``serializer``, ``retry_policy`` (keywords for kombu's
            ``ensure_connection`` and ``publish(retry_policy=...)``),
            ``confirm_publish`` (on AMQP, publisher confirms and ``mandatory``, so an
            unroutable request raises :class:`NoServerError`), ``secret`` (sign every
            request with this HMAC key, and accept only replies signed with it: see
            :func:`kombu_rpc.protocol.check_signature`), ``codec`` and
            ``direct_reply_to`` (on RabbitMQ, take replies through the
            ``amq.rabbitmq.reply-to`` pseudo-queue instead of a declared reply queue;
            replies to calls in flight are lost if the connection drops).

    Raises:
        ConfigurationError: ``direct_reply_to`` on a broker other than RabbitMQ.
    """

    def __init__(self, connection: Connection, options: ProxyOptions) -> None:
        assert options.codec is not None and options.retry_policy is not None
        self._direct = options.direct_reply_to
        self._connection = connection
        self._codec: Codec = options.codec
        self._confirm_publish = options.confirm_publish
        self._secret = protocol.secret_bytes(options.secret)
        self.serializer = options.serializer
        self._accept = {options.serializer, "json"}
        self._retry_policy = dict(options.retry_policy)
        self._closing = False
        self._fresh_state()

    def _fresh_state(self) -> None:
        """Per-process state: a forked child starts over with a reply queue of its own
        (the parent's threads did not survive the fork, and on AMQP its exclusive reply
        queue belongs to the parent's connection)."""
        self._pid = os.getpid()
        self._pending = PendingCalls(self._expired, self.abandon)
        self._lock = threading.Lock()  # guards starting and closing
        self._link_started = False
        self._link = open_link(
            self._connection,
            direct_reply_to=self._direct,
            retry_policy=self._retry_policy,
            pending=self._pending,
            on_reply=self._on_reply,
            accept=self._accept,
            confirm=self._confirm_publish,
        )
        self._broadcasts: dict[str, _Gathering] = {}
        self._canceller = CancelSender(self._connection, self._link.keeps_exchanges, self._secret)
        # the latest calls abandoned, whose replies are dropped without a warning
        self._abandoned: OrderedDict[str, None] = OrderedDict()
        self._abandoning = threading.RLock()  # a Stream finalizer may abandon in a thread holding it

    @property
    def reply_queue(self) -> str:
        """The reply queue's name. On AMQP a new one replaces it after a lost
        connection: the old one went with the connection."""
        return self._link.reply_queue

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
        wants: protocol.Wants | None = None,
        parts: CallParts | None = None,
        correlation_id: str | None = None,
        awaited: bool = False,
    ) -> Future[Any]:
        """Send a request (or queue it for publishing) and return the future of its result.

        The future fails with :class:`RPCTimeout` at the deadline even if the request
        could not be published by then (a stalled connection), and with
        :class:`NoServerError` or :class:`ConnectionLostError` if publishing failed,
        or if the reply can no longer arrive (on AMQP, the connection was lost) and
        not ``retry``. ``retry``: the call is safe to run twice, so it is published
        again instead. ``attended``: the caller goes on to wait in :meth:`wait`.
        ``wants``: what the call asks for besides its reply (a stream, progress,
        keepalives), received into ``parts``; the future's result is then a stream's
        end (``None``). ``correlation_id``: the call's id, if the caller chose it (to
        :meth:`abandon` the call). ``awaited`` (with ``attended``): the caller will come
        back to :meth:`wait` for it even if it leaves meanwhile (a ``map``), so the
        link's thread need not read its reply.
        """
        correlation_id = correlation_id or new_id()
        with context.client_span(method, queue, correlation_id) as span:
            try:
                encoded, headers = self._request(
                    method, args, kwargs, correlation_id, self.reply_queue, timeout, wants
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
        future = self._pending.add(correlation_id, method, timeout, span, queue, job, parts, awaited)
        recorder = metrics.recorder
        if recorder is not None:
            _measure(recorder, future, queue, method)
        try:
            self._link.submit(job, attended)
        except BaseException as exc:  # a failure the link did not turn into the call's outcome
            pending = self._pending.pop(correlation_id)
            if pending is not None:
                pending.reject(exc)  # the call ends here: no deadline, no count left open
            raise
        return future

    def wait(self, future: Future[Any], timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds for a call to end (reading replies in this
        thread); the future holds its outcome, if it ended."""
        if not future.done():
            self._link.wait(future.done, timeout)

    def wait_for(self, ready: Callable[[], bool], timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds until ``ready()`` (reading replies in this
        thread): a stream's next item, or its end."""
        if not ready():
            self._link.wait(ready, timeout)

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
            self._link.submit(
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
                self._link.submit(
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

    def abandon(self, queue: str, correlation_id: str) -> None:
        """The caller stopped call ``correlation_id`` to ``queue``: end it locally (its
        future, if still pending, is cancelled), drop its reply when it comes, take its
        request back where the transport can (Redis), and have a cancel sent to the
        servers of ``queue`` (in the background: this never waits for the broker, and
        may run on an event loop's thread). Unknown or finished calls are cancelled on
        the servers all the same."""
        pending = self._pending.pop(correlation_id)
        deadline = None
        if pending is not None:
            if pending.job is not None:
                deadline = pending.job.headers.get(protocol.DEADLINE_HEADER)
            pending.cancel()
        with self._abandoning:
            abandoned = self._abandoned
            abandoned[correlation_id] = None
            if len(abandoned) > _ABANDONED_KEPT:
                abandoned.popitem(last=False)
        # messages of the call may still come until its server hears the cancel: a
        # Redis proxy closed meanwhile leaves its reply list to expire (RedisLink)
        self._pending.unanswered(monotonic())
        if self._link_started:
            self._link.withdraw(queue, correlation_id)
        self._canceller.send(queue, correlation_id, deadline)

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
        if not self._link.keeps_exchanges:
            return True
        try:
            with self._connection.clone(connect_timeout=min(timeout, PUBLISH_TIMEOUT)) as conn:
                conn.connect()
                try:
                    exchange(conn.default_channel).declare(passive=True)
                except broker_errors(conn, connection=False):
                    return False
        except Exception as exc:
            logger.debug("could not check the broadcast exchange %s: %s", exchange.name, exc)
        return True

    def close(self) -> None:
        """Close the link (it deletes the reply queue and fails the calls still
        pending)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            link = self._link
        if self._link_started:
            link.close()
        link.wake_waiters()
        self._pending.close()
        self._canceller.close()

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
        wants: protocol.Wants | None = None,
    ) -> tuple[protocol.Encoded, dict[str, Any]]:
        """Encode a request body and build its headers: deadline, what it wants besides
        its reply, and signature if any."""
        encoded = self._codec.encode_request(method, args, kwargs, self.serializer)
        deadline = protocol.deadline_after(timeout)
        headers = context.outgoing_headers(correlation_id)
        if deadline is not None:
            headers[protocol.DEADLINE_HEADER] = deadline
        if wants is not None:
            headers[protocol.WANTS_HEADER] = wants.header()
        headers[protocol.SENT_AT_HEADER] = time()
        if self._secret is not None:
            headers.update(
                protocol.signature_headers(
                    self._secret, "request", encoded, correlation_id, reply_to, deadline
                )
            )
        return encoded, headers

    def _start(self) -> None:
        """Start the link unless running."""
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

    def _expired(self, queue: str, correlation_id: str, has_parts: bool) -> None:
        """A call ended at its deadline or idle timeout: have the link take its request
        back, if it can; a stream (or a long call with an idle timeout or progress) is
        also cancelled on the servers, whose generator would otherwise run on unread."""
        if has_parts:
            self.abandon(queue, correlation_id)
        else:
            self._link.withdraw(queue, correlation_id)

    def _wait_sent(self, sent: Future[None], timeout: float, what: str) -> None:
        """Wait until a request was sent (confirmed on AMQP); raise what publishing raised.

        Raises:
            ConnectionLostError: Not sent within ``timeout`` (it is then never sent,
                unless its publish had already begun).
        """
        try:
            self._link.wait_sent(sent, timeout)
        except FuturesTimeout:  # not the builtin TimeoutError before Python 3.11
            if sent.cancel():
                raise ConnectionLostError(
                    f"{what} not sent: the broker took no message for {timeout}s"
                ) from None
            raise ConnectionLostError(
                f"{what} may not have been sent: publishing it took over {timeout}s"
            ) from None

    # -- replies ---------------------------------------------------------------------

    def _on_reply(self, message: Message, decode_error: Exception | None = None) -> None:
        correlation_id = (message.properties or {}).get("correlation_id")
        if not isinstance(correlation_id, str):
            if protocol.CONTROL_HEADER not in (message.headers or {}):
                logger.warning("dropped a reply without correlation_id on %s", self.reply_queue)
                metrics.count_event("dropped_replies", "unknown")
            return
        gathering = self._broadcasts.get(correlation_id)
        if gathering is not None:
            server_id = str((message.headers or {}).get(protocol.SERVER_ID_HEADER, ""))
            try:
                gathering.add(BroadcastReply(server_id, self._read_reply(message, decode_error)))
            except RemoteError as exc:
                gathering.add(BroadcastReply(server_id, error=exc))
            return
        headers = message.headers
        if headers and protocol.PART_HEADER in headers:
            self._on_part(correlation_id, message, headers, decode_error)
            return
        pending = self._pending.pop(correlation_id)
        if pending is None:
            if correlation_id in self._abandoned:  # its caller cancelled it
                logger.debug("dropped the reply of cancelled call %s", correlation_id)
                return
            logger.warning("dropped a late or duplicate reply %s", correlation_id)
            metrics.count_event("dropped_replies", "late")
            return
        try:
            result = self._read_reply(message, decode_error)
        except RemoteError as exc:
            pending.reject(exc.with_traceback(None))  # where its reply was read is no news
        else:
            pending.resolve(result)

    def _on_part(
        self, correlation_id: str, message: Message, headers: dict[str, Any], decode_error: Exception | None
    ) -> None:
        """Route a message of a call other than a plain reply (``x-rpc-part``) to the
        call, left pending; a stream's end completes it. Messages of calls that ended
        (stopped by their caller, failed, timed out) are dropped quietly."""
        pending = self._pending.get(correlation_id)
        parts = None if pending is None else pending.parts
        if parts is None:
            logger.debug("dropped a message of call %s, which is over", correlation_id)
            return
        error: RemoteError | None = None
        result: Any = None
        try:
            part, seq = protocol.read_part(headers)
            if part == protocol.END:
                assert seq is not None
                error = parts.end(seq)
                if error is None:
                    result = self._read_reply(message, decode_error)  # its signature too
            else:
                if self._secret is not None:
                    protocol.check_signature(message, self._secret, protocol.SIGNATURE_WINDOW, "reply")
                if part == protocol.KEEPALIVE:
                    parts.seen()
                    return
                if decode_error is not None:
                    raise decode_error
                value = protocol.parse_part(part, protocol.decode(message))
                if part == protocol.PROGRESS:
                    parts.progress(value)
                    return
                assert seq is not None
                error = parts.item(seq, value)
                if error is None:
                    return
        except RemoteError as exc:
            error = exc
        except Exception as exc:
            kind = headers.get(protocol.PART_HEADER)
            error = RemoteError("MalformedReply", f"a message ({kind!r:.20}) could not be decoded: {exc}")
        ended = self._pending.pop(correlation_id)
        if ended is None:
            return
        if error is not None:
            ended.reject(error.with_traceback(None))
            if headers.get(protocol.PART_HEADER) != protocol.END:  # a gap, an unreadable
                self.abandon(ended.queue, correlation_id)  # item: the server would run on
        else:
            ended.resolve(result)

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


def _measure(recorder: metrics.Recorder, future: Future[Any], queue: str, method: str) -> None:
    """Report a call to ``recorder`` now, and its outcome when its future is done."""
    recorder.client_call_started(queue)
    started = monotonic()

    def ended(done: Future[Any]) -> None:
        outcome = "cancelled" if done.cancelled() else metrics.client_outcome(done.exception())
        recorder.client_call_ended(queue, method, outcome, monotonic() - started)

    future.add_done_callback(ended)
