"""kombu's Redis transport, with one command client per channel (used for ``redis://``
and ``redis+socket://`` unless :func:`check` finds that kombu changed; see
:mod:`kombu_rpc.transports`).

kombu's Redis channel runs every command outside its poller (a publish, the
unacked-index update of a delivery, an ack, a restore) on a ``redis.Redis`` client it
builds for that one operation, and building one fills a table of some 170 response
callbacks and dispatches a pool event: most of the transport's CPU time per message.
:class:`Channel` builds that client once and lends it to every operation, until the
channel's connection pool is replaced (closed, or forked away), when it builds the next
one on the new pool.

Sharing the client changes nothing else. A ``redis.Redis`` on a connection pool holds
no connection of its own: each command takes one from the pool and gives it back, so
the client is as safe between threads as the pool, a connection that failed is
disconnected and reconnects on its next command, and the keys, the ack emulation, the
BRPOP/LISTEN poller and every transport option are kombu's. Sentinel keeps kombu's
transport; TLS (``rediss://``) would work the same, and is left to kombu so that
log lines keep its scheme.

A put on a proxy's reply queue also sets the queue to expire
:data:`REPLY_RETENTION` seconds later: a reply that arrives after its proxy closed
would otherwise leave a list behind forever.
"""

from __future__ import annotations

import inspect
from types import TracebackType
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from ..topology import REPLY_QUEUE_TEMPLATE


class _Lent:
    """A context manager that hands out a client and does nothing on exit."""

    __slots__ = ("client",)

    def __init__(self, client: Any) -> None:
        self.client = client

    def __enter__(self) -> Any:
        return self.client

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


#: Seconds a proxy's reply queue lives after the last reply put in it, unless taken.
#: A reply that comes after its proxy closed would otherwise make the queue again, as a
#: Redis list no one ever deletes; a live proxy takes every reply within moments.
REPLY_RETENTION = 3600.0
_REPLY_PREFIX = REPLY_QUEUE_TEMPLATE.partition("{")[0]
#: Push ARGV[1] on list KEYS[1] and have the list expire ARGV[2] ms later.
_PUT_REPLY = "redis.call('LPUSH', KEYS[1], ARGV[1]) return redis.call('PEXPIRE', KEYS[1], ARGV[2])"


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel, lending one client to every command it runs, whose
    puts on a proxy's reply queue keep it for :data:`REPLY_RETENTION` seconds."""

    _lent: _Lent | None = None

    _put_reply: Any = None  # the script of _PUT_REPLY, registered on first use

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        if not queue.startswith(_REPLY_PREFIX) or kwargs.get("_publish_batch") is not None:
            super()._put(queue, message, **kwargs)
            return
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        with self.conn_or_acquire() as client:
            if self._put_reply is None:
                self._put_reply = client.register_script(_PUT_REPLY)
            # one command, as a plain LPUSH (a pipeline with PEXPIRE costs 30 us more)
            self._put_reply(keys=[key], args=[dumps(message), int(REPLY_RETENTION * 1000)], client=client)

    def conn_or_acquire(self, client: Any = None) -> Any:
        """A context manager yielding ``client``, or else the channel's command client
        (a ``redis.Redis`` on the channel's connection pool, built on first use and
        whenever the pool was replaced)."""
        if client:
            return _Lent(client)
        lent = self._lent
        if lent is None or lent.client.connection_pool is not self._pool:
            lent = self._lent = _Lent(self._create_client())
        return lent

    def _disconnect_pools(self) -> None:
        self._lent = None
        super()._disconnect_pools()


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


class SocketTransport(Transport):
    """:class:`Transport` for ``redis+socket://`` URLs, whose socket path kombu's Redis
    channel reads from the connection's hostname (``socket:///path``)."""

    can_parse_url = True


def check() -> str | None:
    """``None`` if the kombu internals :class:`Channel` overrides or calls are there and
    ``conn_or_acquire`` still lends a given client as it is; else what is wrong."""
    base = kombu_redis.Channel
    missing = [
        name
        for name in ("conn_or_acquire", "_create_client", "_disconnect_pools", "_put", "_q_for_pri")
        if not callable(getattr(base, name, None))
    ]
    if missing or not hasattr(base, "_pool"):
        return f"kombu.transport.redis.Channel lacks {', '.join(missing) or '_pool'}"
    if list(inspect.signature(base._put).parameters)[:3] != ["self", "queue", "message"]:
        return "kombu.transport.redis.Channel._put changed"
    params = list(inspect.signature(base.conn_or_acquire).parameters)
    if params != ["self", "client"]:
        return f"kombu.transport.redis.Channel.conn_or_acquire takes {params}"
    if list(inspect.signature(base._create_client).parameters)[:2] != ["self", "asynchronous"]:
        return "kombu.transport.redis.Channel._create_client changed"
    given = object()
    try:
        with base.conn_or_acquire(None, given) as lent:
            if lent is not given:
                return "kombu.transport.redis.Channel.conn_or_acquire does not lend the client given"
    except Exception as exc:
        return f"kombu.transport.redis.Channel.conn_or_acquire failed: {type(exc).__name__}: {exc}"
    return None
