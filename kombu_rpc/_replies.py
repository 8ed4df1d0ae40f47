"""The server's reply publisher, and how a handled request is settled.

:meth:`ReplyPublisher.publish_reply` sends a reply and returns a :class:`Settlement`:
what must become of its request. The consuming thread replies on the channel it
consumes from; in confirm mode (AMQP with publisher confirms) the request is acked
only once the broker confirmed the reply (:attr:`Settlement.ACK_AFTER_CONFIRM`), and
requeued if the broker refused it. Worker threads reply on connections of their own.
:meth:`ReplyPublisher.settle` carries a settlement out; only the consuming thread
settles.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from threading import get_ident
from time import monotonic
from typing import Any

from kombu import Connection, Producer
from kombu.entity import PERSISTENT_DELIVERY_MODE
from kombu.message import Message

from . import metrics, protocol
from ._dispatch import Reply
from .connection import PUBLISH_TIMEOUT, Heartbeater, publish, publishing_clone, take_confirmed

logger = logging.getLogger("kombu_rpc.server")


class Settlement(enum.Enum):
    """What becomes of a request once its reply was published (or not)."""

    #: Ack it now: its reply was sent (or it needs none).
    ACK = "ack"
    #: Requeue it: its reply could not be sent; the broker delivers it again.
    REQUEUE = "requeue"
    #: Ack it once the broker confirms its reply (requeue it if the broker refuses).
    ACK_AFTER_CONFIRM = "ack-after-confirm"


ACK, REQUEUE, ACK_AFTER_CONFIRM = Settlement.ACK, Settlement.REQUEUE, Settlement.ACK_AFTER_CONFIRM


class ReplyPublisher:
    """Publishes a server's replies and settles its requests.

    Args:
        connection: The server's connection, cloned for the worker threads' replies.
        retry_policy: The retry policy of the worker threads' publishes.
        confirm_publish: Whether the worker threads publish with confirms.
        queue: The request queue (for metrics).
    """

    def __init__(
        self, connection: Connection, retry_policy: dict[str, Any], confirm_publish: bool, queue: str = ""
    ) -> None:
        self._connection = connection
        self._queue = queue
        self._retry_policy = retry_policy
        self._confirm_publish = confirm_publish
        #: The exceptions that mean the connection was lost (set for each run): a
        #: settle failing with one of them raises it, for the consume loop to reconnect.
        self.connection_errors: tuple[type[BaseException], ...] = ()
        self._local = threading.local()
        self._producers: list[Producer] = []  # every worker thread's reply producer
        self._producers_lock = threading.Lock()
        # The consuming thread replies on the channel it consumes from.
        self._consuming_thread: int | None = None
        self._channel: Any = None
        self._confirming = False
        #: Delivery tag of the last reply published on that channel.
        self.reply_tag = 0
        #: Reply delivery tag -> the request to ack once the broker confirms the reply.
        self.unconfirmed: dict[int, Message] = {}
        #: The consuming thread's heartbeater while it runs calls itself (AMQP with
        #: heartbeats): it steps back while that thread publishes an item.
        self.heartbeater: Heartbeater | None = None
        self._keepalives = Keepalives(connection)

    def start(self, connection_errors: tuple[type[BaseException], ...]) -> None:
        """Begin a run: worker threads make new producers on their first reply."""
        self.connection_errors = connection_errors
        self._local = threading.local()

    def bind(self, channel: Any, confirming: bool) -> None:
        """Have the calling (consuming) thread reply on ``channel``, in confirm mode if
        ``confirming``."""
        self._consuming_thread = get_ident()
        self._channel = channel
        self._confirming = confirming
        self.reply_tag = 0
        self.unconfirmed = {}  # a lost channel's requests are redelivered anyway
        if confirming:
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_reply_confirmed)
            channel.events["basic_nack"].add(self._on_reply_refused)

    def publish_reply(self, reply: Reply) -> Settlement:
        """Publish ``reply``; returns what becomes of its request: :data:`REQUEUE`
        when the broker did not take it, :data:`ACK_AFTER_CONFIRM` when its confirm
        is still to come (under :attr:`reply_tag`), else :data:`ACK`."""
        address, encoded, headers = reply
        channel = self._channel
        on_channel = channel is not None and get_ident() == self._consuming_thread
        try:
            if on_channel:  # a lost connection is the consume loop's to handle: no retry
                publish_on_channel(channel, address, encoded, headers)
            else:
                publish(self._worker_producer(), self._retry_policy, **publish_args(reply))
        except Exception as exc:
            logger.error("could not publish the reply to %s: %s", address.reply_to, exc)
            return REQUEUE
        if on_channel and self._confirming:
            self.reply_tag += 1
            return ACK_AFTER_CONFIRM
        return ACK

    def publish_part(self, reply: Reply) -> None:
        """Publish a message of a call other than its final reply (a stream's item, a
        progress message) from the thread that runs the call, the way its final reply
        goes: on the consumed channel from the consuming thread (the heartbeater
        stepping back meanwhile), else on the thread's own connection. So a call's
        messages arrive in the order they were sent.

        Raises:
            Exception: What publishing raised.
        """
        channel = self._channel
        if channel is not None and get_ident() == self._consuming_thread:
            address, encoded, headers = reply
            heartbeater = self.heartbeater
            if heartbeater is not None:
                heartbeater.back()
            try:
                publish_on_channel(channel, address, encoded, headers)
            finally:
                if heartbeater is not None:
                    heartbeater.away()
            if self._confirming:
                self.reply_tag += 1  # its confirm comes too: the final reply's tag is later
        else:
            publish(self._worker_producer(), self._retry_policy, **publish_args(reply))

    def keep_alive(self, interval: float, make: Callable[[], Reply]) -> Any:
        """A context manager sending the keepalive ``make()`` every ``interval`` seconds
        during its ``with`` block (see :class:`Keepalives`)."""
        return self._keepalives.running(interval, make)

    def settle(self, message: Message, settlement: Settlement) -> None:
        """Ack or requeue a handled request (from the consuming thread only); with
        :data:`ACK_AFTER_CONFIRM`, the ack waits for the confirm of the reply just
        published.

        Raises:
            Exception: One of :attr:`connection_errors`: the connection is lost.
        """
        if settlement is ACK_AFTER_CONFIRM:
            self.unconfirmed[self.reply_tag] = message
            return
        try:
            if settlement is ACK:
                message.ack()
            else:
                message.requeue()
        except self.connection_errors as exc:
            # The first sign of a lost connection may come here: let the consume loop
            # reconnect (the broker redelivers the request) instead of polling on.
            logger.warning("could not settle a request: %s", exc)
            raise
        except Exception as exc:  # the channel died; the broker redelivers
            logger.warning("could not settle a request: %s", exc)

    def _on_reply_confirmed(self, delivery_tag: int, multiple: bool) -> None:
        for message in take_confirmed(self.unconfirmed, delivery_tag, multiple):
            self.settle(message, ACK)

    def _on_reply_refused(self, delivery_tag: int, multiple: bool) -> None:
        for message in take_confirmed(self.unconfirmed, delivery_tag, multiple):
            logger.error("the broker refused a reply; requeueing its request")
            metrics.count_server_event(self._queue, "reply_nacks")
            self.settle(message, REQUEUE)

    def await_confirms(self, conn: Connection, timeout: float, idle_wait: float) -> None:
        """Read the confirms of replies already sent, so that their requests are acked
        rather than redelivered (up to ``timeout`` seconds, reading at most
        ``idle_wait`` at a time)."""
        deadline = monotonic() + timeout
        while self.unconfirmed and (remaining := deadline - monotonic()) > 0:
            try:
                conn.drain_events(timeout=min(remaining, idle_wait))
            except TimeoutError:
                pass

    def _worker_producer(self) -> Producer:
        """This worker thread's reply producer, on a connection of its own made on its
        first reply."""
        producer: Producer | None = getattr(self._local, "producer", None)
        if producer is None:
            conn = publishing_clone(self._connection, self._confirm_publish)
            producer = self._local.producer = Producer(conn, auto_declare=False)
            with self._producers_lock:
                self._producers.append(producer)
        return producer

    def close(self) -> None:
        """Release the worker threads' connections, and stop sending keepalives."""
        self._keepalives.close()
        with self._producers_lock:
            producers, self._producers = self._producers, []
        for producer in producers:
            producer.connection.release()


def publish_args(reply: Reply) -> dict[str, Any]:
    """The keywords of ``Producer.publish`` for ``reply``."""
    address, encoded, headers = reply
    return {
        "body": encoded.payload,
        "exchange": "",
        "routing_key": address.reply_to,
        "correlation_id": address.correlation_id,
        "headers": headers,
        "content_type": encoded.content_type,
        "content_encoding": encoded.content_encoding,
        "timeout": PUBLISH_TIMEOUT,  # py-amqp also bounds the wait for the confirm by it
    }


#: A keepalive is published again once, at once, on a revived connection: the thread
#: must not stall the keepalives of other calls.
_KEEPALIVE_RETRY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.1}


class _Keepalive:
    """One call's keepalives: every ``interval`` seconds, ``make()``, while ``alive``."""

    def __init__(self, interval: float, make: Callable[[], Reply]) -> None:
        self.interval = interval
        self.due = monotonic() + interval
        self.make = make
        #: Held while one is published: once the call ends, none goes out any more
        #: (on Redis one sent after its caller deleted its reply queue would make the
        #: queue again, for ever).
        self.lock = threading.Lock()
        self.alive = True


class Keepalives:
    """Sends the keepalives of the calls running whose callers asked for them, from a
    thread and a connection of its own (both made on first use): ordinary calls never
    pay for them. A keepalive that cannot be sent is logged and sent at its next turn,
    on a new connection.

    Args:
        connection: The server's connection, cloned (without confirms).
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._cond = threading.Condition()
        self._calls: set[_Keepalive] = set()
        self._stop: threading.Event | None = None  # the running thread's
        self._thread: threading.Thread | None = None

    @contextmanager
    def running(self, interval: float, make: Callable[[], Reply]) -> Iterator[None]:
        """Send ``make()`` every ``interval`` seconds while the ``with`` block runs;
        none goes out after it."""
        call = _Keepalive(interval, make)
        with self._cond:
            self._calls.add(call)
            if self._stop is None:
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._run, args=(self._stop,), name="kombu_rpc-keepalive", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._calls.discard(call)
            with call.lock:
                call.alive = False

    def _run(self, stop: threading.Event) -> None:
        producer: Producer | None = None
        try:
            while True:
                with self._cond:
                    if stop.is_set():
                        return
                    now = monotonic()
                    due = [call for call in self._calls if call.due <= now]
                    for call in due:
                        call.due = now + call.interval
                    if not due:
                        self._cond.wait(min((call.due for call in self._calls), default=now + 1.0) - now)
                        continue
                for call in due:
                    with call.lock:
                        if not call.alive:
                            continue
                        try:
                            if producer is None:
                                producer = Producer(
                                    publishing_clone(self._connection, False), auto_declare=False
                                )
                            publish(producer, _KEEPALIVE_RETRY, **publish_args(call.make()))
                        except Exception as exc:
                            logger.warning("could not send a keepalive: %s", exc)
                            if producer is not None:
                                producer.connection.release()
                                producer = None
        finally:
            if producer is not None:
                producer.connection.release()

    def close(self) -> None:
        """Stop the thread, if one runs (a later call starts another), and wait for it
        at most :data:`PUBLISH_TIMEOUT`."""
        with self._cond:
            stop, self._stop = self._stop, None
            thread, self._thread = self._thread, None
            if stop is not None:
                stop.set()
                self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(PUBLISH_TIMEOUT)


def publish_on_channel(
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
