"""What every link shares: the interface the client uses, the reply queue's consumer,
and publishing a request on a producer of its own."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from kombu import Connection, Consumer, Producer, Queue

from .._pending import PendingCalls, _Outgoing
from ..connection import broker_errors, publish
from ..errors import CallError, ConnectionLostError, RPCError
from ..topology import DIRECT_REPLY_TO, private_queue
from .turns import Turns

logger = logging.getLogger("kombu_rpc.link")  # the name the guide documents

#: Longest wait for the rest of a frame whose start has arrived.
FRAME_WAIT = 1.0


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


def send(
    producer: Producer, job: _Outgoing, pending: PendingCalls, retry_policy: dict[str, Any], mandatory: bool
) -> None:
    """Publish one request on ``producer`` unless its caller gave up, and report how it
    went to its call (or cast)."""
    if not job.claim(pending):
        return
    try:
        try:
            publish(producer, retry_policy, **job.publish_args(mandatory))
        except broker_errors(producer.connection, operational=True, os_errors=True) as exc:
            raise ConnectionLostError(f"cannot publish to {job.queue!r}: {exc}") from exc
    except RPCError as exc:
        job.fail(pending, exc)
    except Exception as exc:  # never let one request kill the publisher
        logger.exception("unexpected error publishing to %r", job.queue)
        job.fail(pending, ConnectionLostError(f"cannot publish to {job.queue!r}: {exc}"))
    else:
        job.done()


class Link:
    """A proxy's link to its broker: publishes the requests and reads the replies.

    The client sees only this interface; :func:`kombu_rpc._links.open_link` picks the
    class for the transport. A link is also the :class:`~kombu_rpc._links.turns.Reader`
    of its :class:`~kombu_rpc._links.turns.Turns`.

    Args:
        connection: The proxy's connection (cloned).
        reply_queue: The reply queue's name, or ``amq.rabbitmq.reply-to`` (RabbitMQ's
            direct reply-to, not declared).
        retry_policy: Keywords for ``ensure_connection`` on the first connect, and for
            a publish's retries.
        pending: The client's calls in flight.
        on_reply: Called with each reply message (and a decode error, if any).
        accept: Content types accepted for replies.
        confirm: Publish with confirms and ``mandatory`` (where the broker has them).
    """

    #: Whether waiting callers read the connection themselves; if not, the link's
    #: thread reads whenever calls are in flight and callers only wait.
    callers_read = True
    #: Whether the broker keeps exchanges (a broadcast's may be left behind).
    keeps_exchanges = False

    #: Return once ``done()`` or after ``timeout`` seconds, reading the connection
    #: whenever nobody else does (:meth:`Turns.wait <kombu_rpc._links.turns.Turns.wait>`).
    wait: Callable[[Callable[[], bool], float | None], None]
    #: A call was sent that nobody waits on: have the link's thread read, if idle.
    unattended: Callable[[], None]
    #: Have waiting callers look at their calls again (after they were failed).
    wake_waiters: Callable[[], None]

    def __init__(
        self,
        connection: Connection,
        reply_queue: str,
        *,
        retry_policy: dict[str, Any],
        pending: PendingCalls,
        on_reply: Callable[..., None],
        accept: set[str],
        confirm: bool,
    ) -> None:
        self._origin = connection  # publishing connections are cloned from it
        self._conn = connection.clone()
        #: The reply queue's name (on AMQP, a new one after each lost connection).
        self.reply_queue = reply_queue
        self._retry_policy = retry_policy
        self._pending = pending
        self._on_reply = on_reply
        self._accept = accept
        self._confirm = confirm
        self._consumer: Consumer | None = None
        self._broken: BaseException | None = None  # set until the link's thread reconnected
        self._turns = Turns(self, callers_read=self.callers_read)
        # the turns' own methods, not wrappers: no extra call on a call's path
        self.wait = self._turns.wait
        self.unattended = self._turns.unattended
        self.wake_waiters = self._turns.wake_waiters

    # -- what the client uses ------------------------------------------------------------

    def start(self) -> None:
        """Connect, consume the reply queue, and start the link's thread(s).

        Raises:
            Exception: What connecting raised (the connection errors of kombu's
                transport), after the retry policy's attempts.
        """
        raise NotImplementedError

    def submit(self, job: _Outgoing, attended: bool) -> None:
        """Have ``job`` published, within its publish timeout. ``attended``: the caller
        waits for the outcome itself (in :attr:`wait`)."""
        raise NotImplementedError

    def wait_sent(self, sent: Future[None], timeout: float) -> None:
        """Wait up to ``timeout`` seconds until a request was sent (confirmed where
        confirms are on); raise what publishing raised.

        Raises:
            concurrent.futures.TimeoutError: Not sent in time.
        """
        self.wait(sent.done, timeout)
        sent.result(0)

    def withdraw(self, queue: str, correlation_id: str) -> None:
        """Take back, if the transport can, the request of a call that ended
        unanswered; only Redis can (see ``RedisLink``)."""

    def close(self) -> None:
        """Stop reading, fail the calls still pending, stop publishing (once
        :meth:`start` succeeded)."""
        self._close_reading()
        withdrawn = self._pending.fail_all(CallError, "proxy closed before the reply arrived")
        self._close_publishing(withdrawn)
        self.wake_waiters()

    def _close_reading(self) -> None:
        """Stop the link's thread, delete the reply queue, close the reply connection."""
        raise NotImplementedError

    def _close_publishing(self, unanswered: list[tuple[str, str]]) -> None:
        """Stop publishing; ``unanswered``: the (queue, correlation id) of the calls
        just failed, whose requests may still wait in their queues."""

    # -- the reader of the turns ---------------------------------------------------------

    def read(self, timeout: float) -> None:
        """Read what arrives within ``timeout`` seconds (the leader only)."""
        raise NotImplementedError

    def work(self, timeout: float) -> None:
        """The link thread's turn: read for up to ``timeout`` seconds (0: take what has
        come anyway, late replies, without waiting)."""
        self.read(timeout)

    def wake(self) -> None:
        """Make a leader's :meth:`read` return early."""

    def has_work(self) -> bool:
        """True while calls are in flight that no caller will come back for (a
        ``map``'s caller reads for its own calls)."""
        return self._pending.unawaited() > 0

    def awaited(self) -> bool:
        """True while calls are in flight that a caller will come back for."""
        return self._pending.awaited()

    def must_act(self) -> bool:
        """True while only the link's thread may read (a reconnect)."""
        return self._broken is not None
