"""Queue names and declarations: the one home for every name template."""

from __future__ import annotations

import os
from typing import Any

from kombu import Exchange, Queue

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


def check_queue_name(name: object) -> str:
    """Return ``name`` if it can name a request queue on every transport.

    Raises:
        ConfigurationError: It is not a non-empty string of at most 200 characters
            without whitespace, or it starts with RabbitMQ's reserved ``amq.``.
    """
    if not isinstance(name, str) or not name or len(name) > 200 or any(c.isspace() for c in name):
        raise ConfigurationError(
            f"invalid queue name {name!r}: use a non-empty string of at most "
            "200 characters without whitespace"
        )
    if name.startswith("amq."):
        raise ConfigurationError(f"invalid queue name {name!r}: 'amq.' is reserved by RabbitMQ")
    return name


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
    name = BROADCAST_QUEUE_TEMPLATE.format(queue=queue, server_id=server_id)
    return Queue(
        name,
        exchange=broadcast_exchange(queue),
        routing_key="",
        durable=False,
        exclusive=True,
        auto_delete=True,
    )
