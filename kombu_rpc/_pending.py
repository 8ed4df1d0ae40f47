"""The calls a proxy waits on, and the requests it has yet to publish.

:class:`PendingCalls` holds the calls waiting for a reply, by correlation id, and fails
each at its deadline; an ``_Outgoing`` is one request on its way to the broker. Both
are shared by :mod:`kombu_rpc._client`, which makes them, and its link (``kombu_rpc._links``),
which publishes the requests and completes the calls with the replies it reads.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

from kombu import Exchange

from . import context, protocol
from .connection import PUBLISH_TIMEOUT
from .errors import ConnectionLostError, IdleTimeout, RemoteError, RPCError, RPCTimeout

logger = logging.getLogger("kombu_rpc.client")  # the calling side logs as one


class CallParts:
    """What a call receives besides its final reply: a stream's items, progress and
    keepalives. Pure bookkeeping, fed by the thread that reads the replies.

    Items are kept in order, exactly once: an item whose sequence number was seen
    already (a redelivered request run again) is dropped; one that skips a number
    fails the call.

    Args:
        method: The remote function's name (for errors).
        idle_timeout: Fail the call after this many seconds without a message.
        on_progress: Called with each progress value, in the reading thread.
    """

    def __init__(
        self,
        method: str,
        idle_timeout: float | None = None,
        on_progress: Callable[[Any], None] | None = None,
    ) -> None:
        self.method = method
        self.idle_timeout = idle_timeout
        self.on_progress = on_progress
        #: Items received, not taken yet.
        self.items: deque[Any] = deque()
        #: The sequence number of the next item.
        self.next_seq = 0
        #: Duplicates dropped.
        self.duplicates = 0
        #: When a message of the call last arrived (monotonic).
        self.last_seen = monotonic()
        #: Called after an item arrived (an async stream's wake-up), if set.
        self.notify: Callable[[], None] | None = None

    def seen(self) -> None:
        """A message of the call arrived."""
        self.last_seen = monotonic()

    def idle_due(self) -> float | None:
        """When (monotonic) the call fails for silence, if it has an idle timeout."""
        return None if self.idle_timeout is None else self.last_seen + self.idle_timeout

    def item(self, seq: int, value: Any) -> RemoteError | None:
        """Take item number ``seq``; returns the error that ends the call, if any."""
        self.seen()
        if seq < self.next_seq:
            self.duplicates += 1
            logger.debug("dropped a duplicate item %d of %r", seq, self.method)
            return None
        if seq > self.next_seq:
            return self.gap(seq)
        self.items.append(value)
        self.next_seq += 1
        notify = self.notify
        if notify is not None:
            notify()
        return None

    def progress(self, value: Any) -> None:
        """Hand a progress value to the callback (whose errors are logged)."""
        self.seen()
        if self.on_progress is not None:
            try:
                self.on_progress(value)
            except Exception:
                logger.exception("the on_progress callback of a call to %r failed", self.method)

    def end(self, count: int) -> RemoteError | None:
        """The stream ended after ``count`` items; returns an error if some never came."""
        self.seen()
        return self.gap(count) if count > self.next_seq else None

    def gap(self, seq: int) -> RemoteError:
        """The error for a stream whose item ``next_seq`` is missing, seen at ``seq``."""
        return RemoteError(
            "StreamGap",
            f"item {self.next_seq} of the stream of {self.method!r} never arrived (next seen: {seq})",
        )


@dataclass
class _Pending:
    future: Future[Any]
    method: str
    timeout: float | None
    span: Any = None  # the call's OpenTelemetry span, ended before the future completes
    queue: str = ""  # where its request went
    job: _Outgoing | None = None  # its request (AMQP: published again after a lost reply queue)
    parts: CallParts | None = None  # what it receives besides its reply, if anything
    deadline: float | None = None  # monotonic, when it has a timeout
    awaited: bool = False  # its caller comes back to read its reply (see PendingCalls.add)

    def resolve(self, result: Any) -> None:
        context.end_span(self.span)
        try:
            self.future.set_result(result)
        except InvalidStateError:  # cancelled meanwhile: the caller no longer waits
            pass

    def reject(self, error: BaseException) -> None:
        context.end_span(self.span, error)
        try:
            self.future.set_exception(error)
        except InvalidStateError:
            pass

    def cancel(self) -> None:
        """End the call as cancelled (its future's hook does not run again)."""
        context.end_span(self.span, CancelledError())
        Future.cancel(self.future)


class CallFuture(Future[Any]):
    """The future of a call (what ``call_async`` returns): :meth:`cancel` ends the
    call at once and tells its servers (``Client.abandon``).

    It never enters the running state, so it can be cancelled until it is done.
    """

    def __init__(self, abandon: Callable[[str, str], None] | None, queue: str, correlation_id: str) -> None:
        super().__init__()
        self._call = (abandon, queue, correlation_id)

    def cancel(self) -> bool:
        """Cancel the call unless it ended: the future fails with
        :class:`concurrent.futures.CancelledError` at once, a reply that comes later is
        dropped, and the servers of its queue are told to cancel it (see
        :doc:`/cancellation`). Returns whether the future is cancelled."""
        if self.cancelled():
            return True
        if not super().cancel():
            return False
        abandon, queue, correlation_id = self._call
        if abandon is not None:
            abandon(queue, correlation_id)
        return True


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
            # A write cut short may still have reached the broker, and a server then
            # answers after the call failed: keep the reply queue until it could come
            # (a Redis reply list deleted now would be made again by that reply).
            pending.unanswered(monotonic())
            entry = pending.pop(self.correlation_id)
            if entry is not None:
                entry.reject(exc)
            else:
                logger.warning("could not publish an expired request to %r: %s", self.queue, exc)
        else:
            logger.warning("could not publish to %r: %s", self.queue, exc)


class PendingCalls:
    """Calls waiting for a reply, by correlation id, each failed at its deadline.

    Whoever pops an entry completes its future, so a reply and a timeout racing
    for the same call cannot both win. A small thread fails expired calls with
    :class:`RPCTimeout`; it sleeps on a condition until the earliest deadline.
    """

    def __init__(
        self,
        on_expired: Callable[[str, str, bool], None] | None = None,
        on_cancel: Callable[[str, str], None] | None = None,
    ) -> None:
        #: Called with (queue, correlation_id, has_parts) of each call failed at its
        #: deadline or idle timeout (``has_parts``: a stream, or a call with an idle
        #: timeout or progress).
        self._on_expired = on_expired
        #: Called with (queue, correlation_id) of each call whose future was cancelled.
        self._on_cancel = on_cancel
        self._calls: dict[str, _Pending] = {}
        self._unawaited = 0  # calls in _calls added with awaited=False (one int: read unlocked)
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
        parts: CallParts | None = None,
        awaited: bool = False,
    ) -> Future[Any]:
        """Register a call before its request is published; returns its future.
        ``parts``: the call receives more than its reply (its idle timeout is enforced
        here too). ``awaited``: its caller will come back to read its reply (a
        ``map``), so no other thread need read for it (see :meth:`unawaited`)."""
        future = CallFuture(self._on_cancel, queue, correlation_id)
        deadline = None if timeout is None else monotonic() + timeout
        with self._cond:
            self._calls[correlation_id] = _Pending(
                future, method, timeout, span, queue, job, parts, deadline, awaited
            )
            self._unawaited += not awaited
            due = deadline
            if parts is not None and parts.idle_timeout is not None:
                idle = monotonic() + parts.idle_timeout
                due = idle if due is None else min(due, idle)
            if due is not None:
                if len(self._deadlines) > 2 * len(self._calls) + 1024:
                    self._compact()
                heapq.heappush(self._deadlines, (due, correlation_id))
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

    def get(self, correlation_id: str) -> _Pending | None:
        """The call, left in place (for the messages that do not end it), or ``None``."""
        return self._calls.get(correlation_id)

    def pop(self, correlation_id: str) -> _Pending | None:
        """Remove and return the call, or ``None`` if it is unknown or already done."""
        with self._cond:
            return self._take(correlation_id)

    def _take(self, correlation_id: str) -> _Pending | None:
        """Remove and return the call (under ``self._cond``)."""
        pending = self._calls.pop(correlation_id, None)
        if pending is not None and not pending.awaited:
            self._unawaited -= 1
        return pending

    def fail_all(self, exc_factory: type[RPCError], message: str) -> list[tuple[str, str]]:
        """Fail every pending call with ``exc_factory(message)``; returns their
        (queue, correlation_id)."""
        with self._cond:
            calls, self._calls = self._calls, {}
            self._unawaited = 0
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
                    self._take(cid)
                    lost.append(pending)
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

    def unawaited(self) -> int:
        """How many calls in flight no caller will come back for: their replies are
        for the link's thread to read when no caller reads."""
        return self._unawaited

    def awaited(self) -> bool:
        """True while calls are in flight that a caller will come back for."""
        return len(self._calls) > self._unawaited

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
                    pending = self._calls.get(cid)
                    if pending is None:
                        continue
                    parts = pending.parts
                    if parts is not None and parts.idle_timeout is not None:
                        # due at the deadline or when idle: messages may have come since
                        due = parts.last_seen + parts.idle_timeout
                        if pending.deadline is not None and pending.deadline <= due:
                            due = pending.deadline
                        if due > now:
                            heapq.heappush(self._deadlines, (due, cid))
                            continue
                    expired.append((cid, pending))
                    self._take(cid)
                if expired:
                    self._unanswered_until = max(self._unanswered_until, now)
                else:
                    wait = self._deadlines[0][0] - now if self._deadlines else None
                    self._cond.wait(wait)
            for cid, pending in expired:
                parts = pending.parts
                error: RPCTimeout
                if pending.deadline is not None and pending.deadline <= now:
                    assert pending.timeout is not None
                    error = RPCTimeout(pending.method, pending.timeout)
                else:
                    assert parts is not None and parts.idle_timeout is not None
                    error = IdleTimeout(pending.method, parts.idle_timeout)
                pending.reject(error)
                if self._on_expired is not None:
                    self._on_expired(pending.queue, cid, parts is not None)
