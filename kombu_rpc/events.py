"""Events: publish to a fanout, direct or topic exchange; subscribed functions handle them.

The publish/subscribe patterns of the RabbitMQ tutorials 3 to 5, next to RPC:
:class:`EventPublisher` publishes JSON events to an exchange, and functions registered
with :func:`~kombu_rpc.registry.subscribe` (or :meth:`Registry.subscribe
<kombu_rpc.registry.Registry.subscribe>`) are served by the :class:`~kombu_rpc.server.RPCServer`
of their registry, each called with an :class:`Event`. See :doc:`/events`.

A subscription without a group (the default) gives every server a queue of its own:
each server handles every event. A subscription with ``group="name"`` shares one
durable queue between the servers of the group: each event is handled once by the group.

A handler that raises is logged at ERROR with its traceback and its event is acked
(not redelivered: a failing handler would otherwise get the same event forever, as
nameko's handlers do by default); a malformed event (not JSON) is rejected without
requeueing.

Events are JSON by default. A publisher made with ``plain=True`` sends its payloads as
bare UTF-8 text (``text/plain``), the tutorials' wire format; subscribers get a
``text/plain`` event, and one without a content type (as the tutorials' pika programs
send), as a ``str``.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from kombu import Producer

from . import metrics
from .connection import Broker, broker_errors, connect, merge_retry_policy, publish, publishing_clone
from .errors import ConfigurationError, ConnectionLostError, SerializationError
from .topology import (
    check_exchange_name,
    check_exchange_type,
    event_exchange,
    event_queue,
    event_queue_name,
)

logger = logging.getLogger("kombu_rpc.events")

#: The content type of events on the wire: the payload as JSON, UTF-8.
CONTENT_TYPE = "application/json"
#: The content type of plain events (``EventPublisher(plain=True)``): the text, UTF-8.
TEXT_CONTENT_TYPE = "text/plain"
_WILDCARDS = ("*", "#")
#: Longest routing or binding key (AMQP's short string).
_MAX_KEY = 255


@dataclass(frozen=True)
class Event:
    """One event, as a subscribed function receives it."""

    #: The exchange it was published to.
    exchange: str
    #: The key it was published with (empty on a fanout exchange).
    routing_key: str
    #: The decoded JSON payload; a ``str`` for a ``text/plain`` event or one without
    #: a content type.
    payload: Any


def check_routing_key(routing_key: object, type: str) -> str:
    """Return the key to publish with on an exchange of ``type`` (empty for fanout).

    Raises:
        ConfigurationError: ``routing_key`` is not a string of at most 255 bytes
            without whitespace, or it holds a wildcard (``*``, ``#``: binding keys
            only).
    """
    routing_key = _check_key(routing_key, "routing")
    if any(w in routing_key for w in _WILDCARDS):
        raise ConfigurationError(
            f"invalid routing key {routing_key!r}: wildcards ('*', '#') belong in binding keys, "
            "an event is published with a plain key such as 'kern.critical'"
        )
    return "" if type == "fanout" else routing_key


def check_binding_key(binding_key: object, type: str) -> str:
    """Return ``binding_key`` if a queue can be bound with it on an exchange of ``type``.

    Raises:
        ConfigurationError: It is not a string of at most 255 bytes without
            whitespace, or it holds wildcards but the exchange is not a topic one.
    """
    binding_key = _check_key(binding_key, "binding")
    if type == "direct" and any(w in binding_key for w in _WILDCARDS):
        raise ConfigurationError(
            f"invalid binding key {binding_key!r}: wildcards work on topic exchanges only"
        )
    return binding_key


def _check_key(key: object, what: str) -> str:
    """``key`` if it is a string of at most 255 bytes without whitespace."""
    if not isinstance(key, str) or len(key.encode()) > _MAX_KEY:
        raise ConfigurationError(f"invalid {what} key {key!r}: use a string of at most 255 bytes")
    if any(c.isspace() for c in key):
        raise ConfigurationError(f"invalid {what} key {key!r}: no whitespace")
    return key


def encode_payload(payload: Any) -> str:
    """``payload`` as JSON.

    Raises:
        SerializationError: It cannot be written as JSON.
    """
    try:
        return json.dumps(payload, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"cannot encode the event payload as JSON: {exc}") from exc


def encode_text(payload: object) -> bytes:
    """``payload``, a ``str``, as UTF-8 (the body of a plain event).

    Raises:
        SerializationError: It is not a ``str``, or not encodable (lone surrogates).
    """
    if not isinstance(payload, str):
        raise SerializationError(
            f"a plain EventPublisher publishes str payloads, got {type_name(payload)}: "
            "format it first, or publish JSON (plain=False)"
        )
    try:
        return payload.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SerializationError(f"cannot encode the event payload as UTF-8: {exc}") from exc


@dataclass(frozen=True)
class Subscription:
    """A function subscribed to the events of an exchange (see :meth:`of`)."""

    #: The exchange's name.
    exchange: str
    #: ``"fanout"``, ``"direct"`` or ``"topic"``.
    exchange_type: str
    #: The keys its queue is bound with, one or more (ignored on fanout exchanges).
    binding_keys: tuple[str, ...]
    #: ``None``: each server handles every event; a name: the group's servers share
    #: one queue, and each event is handled once.
    group: str | None
    #: Names the subscription's queue: by default the function's module and
    #: qualified name.
    name: str
    #: The handler, called with an :class:`Event`; an ``async def`` one runs on the
    #: server's event loop for ``async def`` functions.
    func: Callable[[Event], Any]

    @classmethod
    def of(
        cls,
        func: Callable[[Event], Any],
        exchange: str,
        binding_keys: str | Sequence[str],
        type: str,
        group: str | None,
        name: str | None,
    ) -> Subscription:
        """Check the arguments of a subscription and build it.

        Raises:
            ConfigurationError: An argument is invalid, or ``func`` is not callable.
        """
        if not callable(func):
            raise ConfigurationError(f"@subscribe needs a callable, got {func!r}")
        check_exchange_name(exchange)
        check_exchange_type(type)
        keys = (binding_keys,) if isinstance(binding_keys, str) else tuple(binding_keys)
        if not keys:
            raise ConfigurationError("@subscribe needs at least one binding key")
        for key in keys:
            check_binding_key(key, type)
        for what, value in (("group", group), ("name", name)):
            if value is not None and (
                not isinstance(value, str) or not value or any(c.isspace() for c in value)
            ):
                raise ConfigurationError(
                    f"invalid {what} {value!r}: use a non-empty string without whitespace"
                )
        if name is None:
            module = getattr(func, "__module__", None) or "handler"
            name = f"{module}.{getattr(func, '__qualname__', None) or type_name(func)}"
        event_queue_name(exchange, name, group, "0" * 32)  # fails now if too long
        return cls(exchange, type, tuple(dict.fromkeys(keys)), group, name, func)

    def queue(self, server_id: str) -> Any:
        """The :class:`kombu.Queue` server ``server_id`` consumes for this subscription."""
        return event_queue(
            self.exchange, self.exchange_type, self.binding_keys, self.name, self.group, server_id
        )


def type_name(obj: object) -> str:
    """The name of ``obj``'s class (for callables without a ``__qualname__``)."""
    return type(obj).__name__


def decode_event(exchange: str, routing_key: str, content_type: str | None, body: Any) -> Event:
    """The :class:`Event` in a message's body: JSON decoded, or for a ``text/plain``
    message or one without a content type, the text as a ``str``.

    Raises:
        SerializationError: Another content type, a JSON body that is not JSON, or a
            text body that is not UTF-8.
    """
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type not in (CONTENT_TYPE, TEXT_CONTENT_TYPE, ""):
        raise SerializationError(
            f"an event must be {CONTENT_TYPE} or {TEXT_CONTENT_TYPE}, got {content_type!r}"
        )
    try:
        text = bytes(body).decode("utf-8") if isinstance(body, (bytes, bytearray, memoryview)) else body
    except UnicodeDecodeError as exc:
        raise SerializationError(f"an event body is not UTF-8 text: {exc}") from exc
    if media_type != CONTENT_TYPE:
        if not isinstance(text, str):
            raise SerializationError(f"a text event's body must be text, got {type_name(text)}")
        return Event(exchange, routing_key, text)
    try:
        payload = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"an event body is not JSON: {exc}") from exc
    return Event(exchange, routing_key, payload)


def handle_event(
    subscription: Subscription, event: Event, run: Callable[[Coroutine[Any, Any, Any]], Any]
) -> bool:
    """Run ``subscription``'s handler on ``event`` (an ``async def`` handler's coroutine
    with ``run``, which waits for it); False if it raised (logged at ERROR with its
    traceback: the event is acked all the same)."""
    try:
        outcome = subscription.func(event)
        if inspect.iscoroutine(outcome):
            run(outcome)
    except Exception:
        logger.exception(
            "event handler %s failed on an event from %r (routing key %r); the event is acked",
            subscription.name,
            event.exchange,
            event.routing_key,
        )
        return False
    return True


class EventPublisher:
    """Publishes JSON (or, with ``plain=True``, text) events to an exchange (created if missing).

    Messages are persistent; on RabbitMQ, with publisher confirms (``publish`` returns
    once the broker took the event). A publish that hits a lost connection is retried
    with ``retry_policy``. Thread-safe (one publish at a time); a context manager.

    Example:
        >>> with EventPublisher("memory://", exchange="logs", type="topic") as events:
        ...     events.publish("kern.critical", {"message": "disk full"})

    Args:
        broker: Broker URL or :class:`kombu.Connection` (cloned); ``None``: the URL
            in ``KOMBU_RPC_BROKER_URL``.
        exchange: The exchange's name.
        type: ``"fanout"``, ``"direct"`` or ``"topic"``.
        retry_policy: Overrides of :data:`kombu_rpc.connection.DEFAULT_RETRY_POLICY`.
        confirm_publish: On AMQP, wait for the broker's confirm of each event.
        plain: Publish ``str`` payloads as bare UTF-8 text (``text/plain``), the
            RabbitMQ tutorials' format, instead of JSON.

    Raises:
        ConfigurationError: An unknown type, an invalid exchange name, a bad broker.
    """

    def __init__(
        self,
        broker: Broker | None = None,
        exchange: str = "logs",
        type: str = "topic",
        *,
        retry_policy: dict[str, Any] | None = None,
        confirm_publish: bool = True,
        plain: bool = False,
    ) -> None:
        #: The exchange's name.
        self.exchange = check_exchange_name(exchange)
        #: The exchange's type.
        self.exchange_type = check_exchange_type(type)
        #: Whether payloads go out as text (``text/plain``) rather than JSON.
        self.plain = bool(plain)
        self._exchange = event_exchange(exchange, type)
        self._retry_policy = merge_retry_policy(retry_policy)
        self._connection = publishing_clone(connect(broker), confirm_publish)
        self._producer: Producer | None = None
        self._lock = threading.Lock()
        self._closed = False

    def publish(self, routing_key: str, payload: Any) -> None:
        """Publish ``payload`` (JSON; a ``str`` as text if the publisher is ``plain``)
        with ``routing_key`` (ignored on a fanout exchange).

        Raises:
            ConfigurationError: The key holds wildcards or whitespace, or the
                publisher is closed.
            SerializationError: The payload cannot be written as JSON (if ``plain``:
                it is not a ``str``).
            ConnectionLostError: The broker could not be reached, or refused the event.
        """
        key = check_routing_key(routing_key, self.exchange_type)
        body: str | bytes = encode_text(payload) if self.plain else encode_payload(payload)
        with self._lock:
            if self._closed:
                raise ConfigurationError("this EventPublisher is closed")
            try:
                if self._producer is None:
                    self._connection.ensure_connection(**self._retry_policy)
                    self._producer = Producer(self._connection)
                publish(
                    self._producer,
                    self._retry_policy,
                    body=body,
                    exchange=self._exchange,
                    routing_key=key,
                    content_type=TEXT_CONTENT_TYPE if self.plain else CONTENT_TYPE,
                    content_encoding="utf-8",
                    delivery_mode=2,
                    declare=[self._exchange],
                )
            except broker_errors(self._connection, operational=True, os_errors=True) as exc:
                raise ConnectionLostError(
                    f"cannot publish an event to {self.exchange!r}: {type_name(exc)}: {exc}"
                ) from exc
        recorder = metrics.recorder
        if recorder is not None:
            recorder.event_published(self.exchange)

    def close(self) -> None:
        """Release the connection; later publishes raise :exc:`~kombu_rpc.errors.ConfigurationError`."""
        with self._lock:
            self._closed = True
            self._producer = None
            self._connection.release()

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<EventPublisher {self.exchange_type} exchange {self.exchange!r}>"
