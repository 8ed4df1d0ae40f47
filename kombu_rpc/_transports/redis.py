"""kombu's Redis transport, with one command client per channel (used for ``redis://``
and ``redis+socket://`` unless :func:`check` finds that kombu changed; see
:mod:`kombu_rpc._transports`).

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
"""

from __future__ import annotations

import inspect
import logging
from types import TracebackType
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str

logger = logging.getLogger("kombu_rpc.transports")


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


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel, lending one client to every command it runs."""

    _lent: _Lent | None = None
    _patterns_confirmed = 0  # as counted by Redis's last subscription confirmation

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

    def close(self) -> None:
        """Close as kombu does, over a copy of the fanout queues.

        kombu keeps them in a class attribute, one dict for every channel of the
        process, and its ``close()`` iterates that dict while deleting the channel's
        own auto-delete fanout queues: another thread declaring a fanout queue
        meanwhile would make it raise ``RuntimeError`` halfway (dictionary changed size
        during iteration). Copying a dict is not interrupted by other threads.
        """
        self.__dict__["_fanout_queues"] = dict(kombu_redis.Channel._fanout_queues)
        super().close()

    def _handle_message(self, client: Any, response: Any) -> Any:
        if bytes_to_str(response[0]) == "psubscribe":  # kombu reads and drops these
            self._patterns_confirmed = int(response[2])
        return super()._handle_message(client, response)

    def listening(self) -> bool:
        """True unless the channel consumes fanout queues whose subscriptions Redis
        has not confirmed yet.

        kombu subscribes at the channel's next poll and reads the confirmations with
        the messages, so a fanout message published just after the consumer started
        would find no subscriber (Redis keeps no PUB/SUB message): polling until this
        is true closes that window. Each confirmation counts the connection's patterns.
        """
        if not self.active_fanout_queues:
            return True
        subclient = self.__dict__.get("subclient")  # a cached property: not made here
        patterns = len(getattr(subclient, "patterns", ()))
        return patterns > 0 and self._patterns_confirmed >= patterns


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


class SocketTransport(Transport):
    """:class:`Transport` for ``redis+socket://`` URLs, whose socket path kombu's Redis
    channel reads from the connection's hostname (``socket:///path``)."""

    can_parse_url = True


def abandon(channel: Any) -> None:
    """Finish closing a kombu Redis channel (kombu's or :class:`Channel`) whose
    ``close()`` failed halfway on a lost connection, without waiting on Redis.

    kombu's ``Channel.close`` talks to Redis before it lets go of anything: it reads
    the reply of a BRPOP in flight, then deletes the bindings of the channel's
    auto-delete fanout queues (a server's broadcast queue) on the channel's BRPOP
    client. On a connection that was cut, either raises, and the rest of ``close`` is
    skipped: the channel stays in its transport, consuming, and its sockets stay
    registered in the poller that every channel of the transport shares. There the
    dead pub/sub socket of the channel is reported readable (reset) at every poll,
    ahead of the sockets of the channel that replaced it; the poller handles one
    socket per poll, so the new channel's BRPOP reply is never read, and the
    connection serves nothing again (the request that BRPOP took sits unread until
    the channel closes).

    This takes the channel out of the poller and its socket tables, closes its
    connections, cancels its consumers, and gives its unacknowledged messages back to
    their queues if Redis can be reached (otherwise Redis restores them after the
    visibility timeout, as after a crash).
    """
    transport = channel.connection
    cycle = getattr(transport, "cycle", None)
    if isinstance(cycle, kombu_redis.MultiChannelPoller):
        cycle.discard(channel)
        sockets = getattr(cycle, "_chan_to_sock", {})
        for ident, sock in list(sockets.items()):
            if ident[0] is channel:
                del sockets[ident]
                try:
                    cycle.poller.unregister(sock)
                except (OSError, KeyError, ValueError, TypeError):
                    pass
        channels = getattr(cycle, "_fd_to_chan", {})
        for fd, (owner, _) in list(channels.items()):
            if owner is channel:
                del channels[fd]
    channel._in_poll = channel._in_listen = None
    _quietly(getattr(channel, "_close_clients", lambda: None))
    _quietly(channel._disconnect_pools)
    channel.__dict__.pop("client", None)  # closed: a new one would open a connection
    _quietly(lambda: virtual.Channel.close(channel))  # consumers, unacked messages
    _quietly(channel._disconnect_pools)  # what restoring unacked messages opened


def _quietly(step: Any) -> None:
    try:
        step()
    except Exception as exc:  # the connection is gone: what is left goes with it
        logger.debug("abandoning a Redis channel: %s: %s", type(exc).__name__, exc)


def check() -> str | None:
    """``None`` if the kombu internals :class:`Channel` overrides are there and
    ``conn_or_acquire`` still lends a given client as it is; else what is wrong."""
    base = kombu_redis.Channel
    missing = [
        name
        for name in ("conn_or_acquire", "_create_client", "_disconnect_pools", "_handle_message", "close")
        if not callable(getattr(base, name, None))
    ]
    missing += [name for name in ("_pool", "subclient") if not hasattr(base, name)]
    if not isinstance(getattr(base, "_fanout_queues", None), dict):
        missing.append("_fanout_queues")
    if missing:
        return f"kombu.transport.redis.Channel lacks {', '.join(missing)}"
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
