"""Queue names and declarations: the one home for every name template."""

from __future__ import annotations

import os
from typing import Any

from kombu import Exchange, Queue, binding

from ._transports import REPLY_QUEUE_PREFIX
from .connection import broker_errors
from .errors import ConfigurationError

#: The request queue used when none is given.
DEFAULT_QUEUE = "rpc_queue"
#: Each proxy consumes replies from one queue named after this template.
REPLY_QUEUE_TEMPLATE = REPLY_QUEUE_PREFIX + "{uid}"
#: RabbitMQ's pseudo-queue for direct reply-to (no reply queue is declared).
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
#: Each server consumes wake-up (control) messages from one queue named after this.
CONTROL_QUEUE_TEMPLATE = "kombu_rpc.server.{server_id}"
#: Broadcasts to the servers of request queue ``queue`` go through this fanout exchange.
BROADCAST_EXCHANGE_TEMPLATE = "kombu_rpc.broadcast.{queue}"
#: Each server receives broadcasts on one queue named after this, bound to the exchange.
BROADCAST_QUEUE_TEMPLATE = "kombu_rpc.broadcast.{queue}.{server_id}"
#: Cancels of calls to request queue ``queue`` go through this fanout exchange.
CANCEL_EXCHANGE_TEMPLATE = "kombu_rpc.cancel.{queue}"
#: Each server's cancel listener reads cancels from one queue named after this.
CANCEL_QUEUE_TEMPLATE = "kombu_rpc.cancel.{queue}.{server_id}"
#: Where cancels wait while no server of the queue runs (RabbitMQ, memory://).
HELD_CANCELS_TEMPLATE = "kombu_rpc.cancel.{queue}.held"
#: Milliseconds a queue of held cancels outlives its last use (RabbitMQ's ``x-expires``):
#: as long as a cancel is kept at most.
HELD_CANCELS_EXPIRE_MS = 3_600_000
#: The exchange types events go through (:mod:`kombu_rpc.events`).
EVENT_EXCHANGE_TYPES = ("fanout", "direct", "topic")
#: A subscription without a group: each server's own queue, bound to the event exchange.
EVENT_QUEUE_TEMPLATE = "kombu_rpc.events.{exchange}.{handler}.{server_id}"
#: A subscription of group ``group``: one durable queue shared by the group's servers.
EVENT_GROUP_QUEUE_TEMPLATE = "kombu_rpc.events.{exchange}.{group}.{handler}"
#: Longest queue name RabbitMQ takes (255 bytes); event queue names are checked against it.
_MAX_QUEUE_NAME = 255


def check_queue_name(name: object) -> str:
    """Return ``name`` if it can name a request queue on every transport.

    Raises:
        ConfigurationError: It is not a non-empty string of at most 200 characters
            without whitespace, or it starts with RabbitMQ's reserved ``amq.``.
    """
    return _check_name(name, "queue")


def new_id() -> str:
    """A fresh unique id for correlation ids, reply queues and servers: 128 random bits
    as 32 hex digits (the form of ``uuid.uuid4().hex``, at half the cost)."""
    return os.urandom(16).hex()


def request_queue(name: str, durable: bool = False, arguments: dict[str, Any] | None = None) -> Queue:
    """The shared queue a server consumes requests from.

    It is bound to the default exchange under its own name, like the tutorial's
    ``rpc_queue``, and is not durable unless asked for. ``arguments`` are the
    broker's queue arguments, e.g. ``{"x-queue-type": "quorum", "x-delivery-limit": 5}``
    on RabbitMQ.
    """
    return Queue(name, routing_key=name, durable=durable, auto_delete=False, queue_arguments=arguments)


def discard_queue(queue: Queue) -> None:
    """Delete a bound private queue and whatever is left in it.

    Purging first matters on Redis, where deleting a queue without bindings leaves
    its list (and any message in it) behind. Errors are ignored: on AMQP the broker
    drops exclusive queues with their connection anyway.
    """
    channel = queue.channel
    if channel is None or getattr(channel, "connection", None) is None:
        return  # the channel died with its connection; AMQP dropped the queue with it
    conn = channel.connection.client
    try:
        queue.purge()
        queue.delete()
    except broker_errors(conn):
        pass


def private_queue(name: str) -> Queue:
    """A queue owned by one proxy (replies) or one server (control messages).

    On AMQP it is exclusive, so the broker deletes it when its connection closes.
    """
    return Queue(name, routing_key=name, durable=False, exclusive=True, auto_delete=True)


def broadcast_exchange(queue: str) -> Exchange:
    """The fanout exchange that reaches every server of request queue ``queue``.

    Servers and proxies both declare it, with the same arguments. It is auto-delete:
    RabbitMQ drops it when the last server's queue is unbound from it.
    """
    return Exchange(
        BROADCAST_EXCHANGE_TEMPLATE.format(queue=queue), type="fanout", durable=False, auto_delete=True
    )


def broadcast_queue(queue: str, server_id: str) -> Queue:
    """Server ``server_id``'s own queue for broadcasts to the servers of ``queue``.

    Exclusive like the other private queues: on AMQP it goes with its connection. The
    binding has an empty routing key, as broadcasts are published with: kombu's Redis
    transport subscribes to a topic named after the binding's routing key.
    """
    return _bound_to_fanout(
        BROADCAST_QUEUE_TEMPLATE.format(queue=queue, server_id=server_id), broadcast_exchange(queue)
    )


def cancel_exchange(queue: str) -> Exchange:
    """The fanout exchange that takes a cancel to every server of request queue
    ``queue`` (see :doc:`/cancellation`). Servers declare it; auto-delete, like
    :func:`broadcast_exchange`."""
    return Exchange(
        CANCEL_EXCHANGE_TEMPLATE.format(queue=queue), type="fanout", durable=False, auto_delete=True
    )


def cancel_queue(queue: str, server_id: str) -> Queue:
    """The queue of server ``server_id``'s cancel listener, bound to
    :func:`cancel_exchange` (exclusive, with an empty binding key, like
    :func:`broadcast_queue`)."""
    return _bound_to_fanout(
        CANCEL_QUEUE_TEMPLATE.format(queue=queue, server_id=server_id), cancel_exchange(queue)
    )


def _bound_to_fanout(name: str, exchange: Exchange) -> Queue:
    """A server's own queue ``name``, bound to the fanout ``exchange`` with an empty
    routing key: non-durable, exclusive and auto-delete."""
    return Queue(name, exchange=exchange, routing_key="", durable=False, exclusive=True, auto_delete=True)


def held_cancels(queue: str) -> Queue:
    """The durable queue where the cancels of calls to ``queue`` wait while no server
    of it runs, each until its call's deadline (see :doc:`/cancellation`): a server's
    cancel listener reads them when it starts, and leaves them for the next server.
    RabbitMQ deletes the queue an hour after its last use."""
    name = HELD_CANCELS_TEMPLATE.format(queue=queue)
    return Queue(
        name,
        routing_key=name,
        durable=True,
        auto_delete=False,
        queue_arguments={"x-expires": HELD_CANCELS_EXPIRE_MS},
    )


def check_exchange_name(name: object) -> str:
    """Return ``name`` if it can name an event exchange on every transport.

    Raises:
        ConfigurationError: It is not a non-empty string of at most 200 characters
            without whitespace, or it starts with RabbitMQ's reserved ``amq.``.
    """
    return _check_name(name, "exchange")


def _check_name(name: object, what: str) -> str:
    """``name`` if it can name a queue or an exchange (``what``) on every transport."""
    if not isinstance(name, str) or not name or len(name) > 200 or any(c.isspace() for c in name):
        raise ConfigurationError(
            f"invalid {what} name {name!r}: use a non-empty string of at most "
            "200 characters without whitespace"
        )
    if name.startswith("amq."):
        raise ConfigurationError(f"invalid {what} name {name!r}: 'amq.' is reserved by RabbitMQ")
    return name


def check_exchange_type(type: object) -> str:
    """Return ``type`` if it is one of :data:`EVENT_EXCHANGE_TYPES`.

    Raises:
        ConfigurationError: It is not.
    """
    if type not in EVENT_EXCHANGE_TYPES:
        raise ConfigurationError(
            f"unknown exchange type {type!r}: use one of {', '.join(map(repr, EVENT_EXCHANGE_TYPES))}"
        )
    return str(type)


def event_exchange(name: str, type: str) -> Exchange:
    """The exchange events named ``name`` go through, of ``type`` (``"fanout"``,
    ``"direct"`` or ``"topic"``).

    Publishers and servers both declare it, with the same arguments: durable, not
    auto-delete (it outlives its publishers and subscribers, as the bindings of a
    group's durable queue must).
    """
    return Exchange(name, type=type, durable=True, auto_delete=False)


def event_queue_name(exchange: str, handler: str, group: str | None, server_id: str) -> str:
    """The name of the queue a subscription consumes: the group's shared queue
    (:data:`EVENT_GROUP_QUEUE_TEMPLATE`) or, without a group, server ``server_id``'s
    own (:data:`EVENT_QUEUE_TEMPLATE`).

    Raises:
        ConfigurationError: The name would be longer than RabbitMQ allows.
    """
    if group is None:
        name = EVENT_QUEUE_TEMPLATE.format(exchange=exchange, handler=handler, server_id=server_id)
    else:
        name = EVENT_GROUP_QUEUE_TEMPLATE.format(exchange=exchange, group=group, handler=handler)
    if len(name.encode()) > _MAX_QUEUE_NAME:
        raise ConfigurationError(
            f"event queue name {name[:60]!r}... is longer than {_MAX_QUEUE_NAME} bytes: "
            "use a shorter exchange, group or handler name (name=...)"
        )
    return name


def event_queue(
    exchange: str,
    type: str,
    binding_keys: tuple[str, ...],
    handler: str,
    group: str | None,
    server_id: str,
) -> Queue:
    """The queue a subscription consumes, bound to its exchange with each of
    ``binding_keys``.

    Without a group it is server ``server_id``'s own: exclusive and auto-delete, like
    the tutorials' queues (on AMQP it goes with its connection; the server deletes it
    at stop on other transports). A group's queue is durable and shared: each event
    goes to one of the group's servers, and events wait in it while none is running.
    A fanout exchange ignores routing keys: its queues are bound with an empty one, as
    kombu's Redis transport subscribes to a topic named after it.
    """
    name = event_queue_name(exchange, handler, group, server_id)
    target = event_exchange(exchange, type)
    keys = [""] if type == "fanout" else list(binding_keys)
    private = group is None
    return Queue(
        name,
        bindings=[binding(target, routing_key=key) for key in keys],
        durable=not private,
        exclusive=private,
        auto_delete=private,
    )
