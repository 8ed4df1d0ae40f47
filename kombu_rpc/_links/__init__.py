"""A proxy's link to its broker: one per transport, owning both the publishing of
requests and the reading of replies.

The client sees only the :class:`~kombu_rpc._links.base.Link` interface (``start``,
``submit``, ``wait``, ``wait_sent``, ``withdraw``, ``close``); :func:`open_link` picks
the class, once, from the transport's kind:

* ``amqp`` (RabbitMQ): ``AmqpLink`` (:mod:`~kombu_rpc._links.amqp`) publishes from the
  calling threads, in confirm mode, on the connection it reads.
* ``memory``: ``MemoryLink`` (:mod:`~kombu_rpc._links.memory`) publishes inline.
* ``redis``: ``RedisLink`` (:mod:`~kombu_rpc._links.polling`), waiting callers reading
  with a BRPOP; a publisher thread publishes.
* ``polling`` (every other transport): ``PollingLink``, its thread reading; a
  publisher thread publishes.

Waiting callers (or the link's thread) take turns reading: see
:mod:`~kombu_rpc._links.turns`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kombu import Connection

from .._pending import PendingCalls
from .._transports import Kind, kind
from ..errors import ConfigurationError
from ..topology import DIRECT_REPLY_TO, REPLY_QUEUE_TEMPLATE, new_id
from .amqp import AmqpLink
from .base import Link
from .memory import MemoryLink
from .polling import PollingLink, RedisLink

__all__ = ["Link", "open_link"]

#: The link class of each kind of transport.
_LINKS: dict[Kind, type[Link]] = {
    Kind.AMQP: AmqpLink,
    Kind.MEMORY: MemoryLink,
    Kind.REDIS: RedisLink,  # Redis only: its reads are BRPOPs
    Kind.POLLING: PollingLink,  # every other transport
}


def open_link(
    connection: Connection,
    *,
    direct_reply_to: bool,
    retry_policy: dict[str, Any],
    pending: PendingCalls,
    on_reply: Callable[..., None],
    accept: set[str],
    confirm: bool,
) -> Link:
    """The link for ``connection``'s transport, not started yet, with a new reply queue
    (or RabbitMQ's direct reply-to pseudo-queue).

    Args:
        connection: The proxy's connection (the link clones it).
        direct_reply_to: Take replies through ``amq.rabbitmq.reply-to``.
        retry_policy: Keywords for kombu's ``ensure_connection`` and ``publish``.
        pending: The client's calls in flight.
        on_reply: Called with each reply message (and a decode error, if any).
        accept: Content types accepted for replies.
        confirm: Publish with confirms and ``mandatory`` (RabbitMQ).

    Raises:
        ConfigurationError: ``direct_reply_to`` on a broker other than RabbitMQ.
    """
    transport = kind(connection)
    if direct_reply_to and transport is not Kind.AMQP:
        raise ConfigurationError("direct_reply_to is a RabbitMQ feature: it needs an amqp:// broker")
    reply_queue = DIRECT_REPLY_TO if direct_reply_to else REPLY_QUEUE_TEMPLATE.format(uid=new_id())
    return _LINKS[transport](
        connection,
        reply_queue,
        retry_policy=retry_policy,
        pending=pending,
        on_reply=on_reply,
        accept=accept,
        confirm=confirm,
    )
