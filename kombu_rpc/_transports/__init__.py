"""The one place that knows kombu's transports: which one a broker URL gets, and how
kombu_rpc drives it.

Every broker URL is opened by :func:`open_connection`, and everything else in
kombu_rpc asks :func:`kind` how to drive the connection, never its URL scheme. The
kinds:

* ``amqp``: ``amqp://``, ``pyamqp://``, ``amqps://``. Publisher confirms and
  ``mandatory`` requests; replies are read by select() on the socket.
* ``redis``: ``redis://``, ``rediss://``, ``redis+socket://``, ``sentinel://``.
  Replies are read by BRPOP; socket timeouts bound every command.
* ``memory``: ``memory://``. A put wakes the consumers of its queue at once.
* ``polling``: every other kombu transport (``filesystem://``, ``sqla+...://``,
  ``sqs://``, ...), and ``memory://`` on kombu's own transport. kombu polls each
  queue every ``polling_interval`` seconds (:data:`POLLING_INTERVAL` unless the
  connection's ``transport_options`` set it), and any error of the transport counts
  as a lost connection: the server and the proxy reconnect.

kombu_rpc's own transports (:mod:`~kombu_rpc._transports.amqp`,
:mod:`~kombu_rpc._transports.redis`, :mod:`~kombu_rpc._transports.memory`) are
subclasses of kombu's that are faster on a call's hot path;
:mod:`~kombu_rpc._transports.filesystem` is one that does not lose messages. They
override private kombu and py-amqp methods, so each is imported only when its URL is
used, checks at import that those internals are there and behave as it expects, and
if not, kombu's own transport is used instead, with one warning. Setting the environment variable
:data:`FAST_TRANSPORTS_ENV` to ``0`` always uses kombu's own transports.

A connection keeps the transport class chosen for it when kombu fails over to another
URL of its list (:class:`PinnedConnection`). A URL string of several ``;``-separated
URLs is tried in a random order, and an ``amqp`` URL asks for heartbeats every
:data:`AMQP_HEARTBEAT` seconds unless it sets ``?heartbeat=``; a
:class:`kombu.Connection` given instead keeps its own order, failover strategy and
heartbeat.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import os
import random
import warnings
from collections.abc import Sequence
from time import monotonic
from types import ModuleType
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from kombu import Connection, Queue
from kombu.transport import resolve_transport, virtual
from kombu.utils.imports import symbol_by_name

from ..errors import ConfigurationError, TransportFallbackWarning

__all__ = [
    "FAST_TRANSPORTS_ENV",
    "POLLING_INTERVAL",
    "AMQP_HEARTBEAT",
    "Kind",
    "kind",
    "open_connection",
    "fast_module",
    "PinnedConnection",
    "PollingConnection",
    "unread",
    "close_channel",
    "lease",
    "Lease",
    "REPLY_QUEUE_PREFIX",
]

#: Environment variable that turns kombu_rpc's own transports off (``0``, ``false``,
#: ``no`` or ``off``): every URL then gets kombu's stock transport.
FAST_TRANSPORTS_ENV = "KOMBU_RPC_FAST_TRANSPORTS"
#: Seconds between two polls of a queue on a ``polling`` transport, unless the
#: connection's ``transport_options`` set ``polling_interval`` (kombu's default, 1 s,
#: would add up to two seconds to every call: one poll for the request, one for the reply).
POLLING_INTERVAL = 0.05
#: Longest time a ``redis`` command may block before its connection counts as lost,
#: unless the connection sets ``socket_timeout``: without one, redis-py waits forever
#: on a half-open connection (a stalled broker). The same as a publish's limit,
#: :data:`kombu_rpc.connection.PUBLISH_TIMEOUT`.
REDIS_SOCKET_TIMEOUT = 10.0
#: Longest time connecting to Redis may take, unless ``socket_connect_timeout`` is set.
REDIS_CONNECT_TIMEOUT = 5.0
#: The AMQP heartbeat, in seconds, that a connection opened from an ``amqp://`` URL
#: proposes, unless the URL sets ``?heartbeat=`` (``0``: none). RabbitMQ proposes the
#: same, and takes the lower of the two: a connection that sends nothing for two
#: intervals is closed, and one that hears nothing as long counts as lost.
AMQP_HEARTBEAT = 60.0
#: Names of proxies' reply queues start with this
#: (:data:`kombu_rpc.topology.REPLY_QUEUE_TEMPLATE`): ``memory://`` drops a message to
#: such a queue once its proxy closed, as RabbitMQ does with an exclusive queue.
REPLY_QUEUE_PREFIX = "kombu_rpc.reply."


class Kind(str, enum.Enum):
    """How kombu_rpc drives a transport (see the module's list)."""

    AMQP = "amqp"
    REDIS = "redis"
    MEMORY = "memory"
    POLLING = "polling"


#: kombu's transport aliases that kombu_rpc has a transport of its own for, and the
#: module of :mod:`kombu_rpc._transports` holding it.
_FAST_MODULES = {
    "amqp": "amqp",
    "pyamqp": "amqp",
    "redis": "redis",
    "memory": "memory",
    "filesystem": "filesystem",
}
#: kombu's transport classes that kombu_rpc has a transport of its own for, by alias.
_STOCK = {
    "kombu.transport.pyamqp:Transport": "amqp",
    "kombu.transport.redis:Transport": "redis",
    "kombu.transport.memory:Transport": "memory",
    "kombu.transport.filesystem:Transport": "filesystem",
}
#: Aliases served by kombu's Redis transport, which needs redis-py.
_REDIS_ALIASES = {"redis", "rediss", "sentinel"}
#: Module name -> the module, or None if it fell back (checked once).
_checked: dict[str, ModuleType | None] = {}


def fast_module(name: str) -> ModuleType | None:
    """kombu_rpc's transport module ``name`` (``"amqp"``, ``"redis"``, ``"memory"`` or
    ``"filesystem"``), or ``None`` if :data:`FAST_TRANSPORTS_ENV` turns them off or the
    module's check of the kombu internals it relies on failed (warned about once per
    process)."""
    if os.environ.get(FAST_TRANSPORTS_ENV, "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    if name not in _checked:
        module: ModuleType | None = None
        try:
            module = importlib.import_module(f"{__name__}.{name}")
            problem = module.check()
        except Exception as exc:  # an internal renamed or gone: the module cannot even load
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None and module is not None:
            _checked[name] = module
        else:
            _checked[name] = None
            warnings.warn(
                f"kombu_rpc's {name} transport does not fit the installed kombu/py-amqp "
                f"({problem}); using kombu's own transport instead",
                TransportFallbackWarning,
                stacklevel=2,
            )
    return _checked[name]


def open_connection(broker: Connection | str) -> Connection:
    """A new, unconnected :class:`kombu.Connection` for ``broker`` on the transport
    kombu_rpc drives it with, and with transport options of its own (the caller's
    connection and its ``transport_options`` are never changed). It keeps that
    transport after a failover to another URL of its list (:class:`PinnedConnection`).

    A URL string of several ``;``-separated URLs is tried in a random order (kombu's
    ``round-robin`` failover then goes through the others in that order), so that
    servers and proxies spread over the nodes of a cluster; an ``amqp`` URL proposes
    heartbeats every :data:`AMQP_HEARTBEAT` seconds unless it sets ``?heartbeat=``. A
    :class:`kombu.Connection` keeps its own order, failover strategy and heartbeat.

    Raises:
        ConfigurationError: ``broker`` names an unknown transport, or one whose
            client library is not installed.
    """
    if isinstance(broker, str):
        conn = _from_urls(broker)
    else:
        conn = broker.clone()
    options = dict(conn.transport_options)  # kombu's clone() shares the caller's dict
    transport = conn.transport_cls
    alias = (
        transport
        if isinstance(transport, str)
        else _STOCK.get(f"{transport.__module__}:{transport.__name__}")
    )
    stock = _transport_class(conn)
    fast = fast_module(_FAST_MODULES[alias]) if alias in _FAST_MODULES else None
    chosen: Any = stock
    if fast is not None:
        chosen = fast.SocketTransport if conn.uri_prefix == "redis" else fast.Transport
    polls = (
        chosen.driver_type != "redis"
        and issubclass(chosen, virtual.Transport)
        and not hasattr(chosen, "wake")
    )
    interval = options.pop("polling_interval", None) if polls else None
    if chosen.driver_type == "redis":
        options.setdefault("socket_timeout", REDIS_SOCKET_TIMEOUT)
        options.setdefault("socket_connect_timeout", REDIS_CONNECT_TIMEOUT)
    if chosen is stock:
        conn = conn.clone(transport_options=options)
    elif alias == "memory":
        conn = Connection(transport=chosen, transport_options=options)
    elif conn.uri_prefix == "redis":  # redis+socket://: kombu reads the socket path from the hostname
        conn = Connection(
            hostname=conn.hostname,
            userid=conn.userid,
            password=conn.password,
            virtual_host=conn.virtual_host,
            ssl=conn.ssl,
            transport=chosen,
            transport_options=options,
            connect_timeout=conn.connect_timeout,
        )
    else:
        conn = conn.clone(transport=chosen, transport_options=options)
    if type(conn) is Connection:  # kombu's own class (a caller's subclass stays as it is)
        conn.__class__ = PinnedConnection
    return _polling(conn, interval) if polls else conn


def _from_urls(urls: str) -> Connection:
    """kombu's connection for a URL string, its URLs in a random order, proposing
    :data:`AMQP_HEARTBEAT` on AMQP unless the first URL given sets ``?heartbeat=``
    (which then holds for the whole list, whichever URL comes first)."""
    parts = [url.strip() for url in urls.split(";") if url.strip()] or [urls]
    for alias in {url.partition("://")[0].partition("+")[0] for url in parts}:
        _require_client(alias)
    first = Connection(parts[0])  # as given: its heartbeat is the URL's, or none
    heartbeat = first.heartbeat
    given = "heartbeat" in parse_qs(urlsplit(parts[0]).query)
    if _transport_class(first).driver_type == "amqp" and not given:
        heartbeat = AMQP_HEARTBEAT
    return Connection(";".join(random.sample(parts, len(parts))), heartbeat=heartbeat)


def _require_client(alias: str) -> None:
    """Raise a clear error if the libraries kombu's transport ``alias`` needs are
    missing (kombu fails on them as soon as a URL names the transport)."""
    if alias in _REDIS_ALIASES:
        missing = [name for name in ("redis", "packaging") if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigurationError(
                f"{alias}:// needs {' and '.join(missing)}, which kombu's Redis transport imports: "
                "pip install 'redis>=5.2,<9' (pip install -e '.[redis]' in a kombu_rpc checkout)"
            )


def _transport_class(conn: Connection) -> Any:
    """The transport class ``conn`` uses (importing kombu's module for it)."""
    transport = conn.transport_cls
    if isinstance(transport, type):
        return transport
    return symbol_by_name(resolve_transport(transport))


class PinnedConnection(Connection):  # type: ignore[misc]
    """A :class:`kombu.Connection` that keeps its transport class when kombu fails over
    to the next URL of its list.

    kombu's :meth:`~kombu.Connection.switch` (called by ``ensure_connection`` after a
    failed attempt, through ``maybe_switch_next``) parses the next URL again, and its
    scheme would replace the transport class kombu_rpc chose with kombu's stock one.
    Clones are of this class too, and carry the class.
    """

    #: The transport: a class, or the alias of one of kombu's (kombu's attribute).
    transport_cls: Any

    def switch(self, conn_str: str) -> None:
        """kombu's switch to ``conn_str``; the transport class stays, unless the new
        URL's transport is another one (an ``amqps://`` URL after an ``amqp://`` one)."""
        pinned = self.transport_cls
        super().switch(conn_str)
        if isinstance(pinned, type) and pinned is not self.transport_cls:
            if issubclass(pinned, _transport_class(self)):
                self.transport_cls = pinned


class PollingConnection(PinnedConnection):
    """A :class:`kombu.Connection` whose transports poll every :attr:`polling_interval`
    seconds; its clones poll as often.

    The interval is not a transport option: kombu hands ``transport_options`` on to
    some transports' clients (SQLAlchemy's ``create_engine``), which refuse options
    they do not know.
    """

    #: Seconds between two polls of a queue.
    polling_interval: float = POLLING_INTERVAL

    def create_transport(self) -> Any:
        """kombu's transport for this connection, polling every :attr:`polling_interval`."""
        transport = super().create_transport()
        transport.polling_interval = self.polling_interval
        return transport

    def clone(self, **kwargs: Any) -> Connection:
        """kombu's clone, polling as often (a pickled copy polls every
        :data:`POLLING_INTERVAL`)."""
        conn = super().clone(**kwargs)
        conn.polling_interval = self.polling_interval
        return conn


def _polling(conn: Connection, interval: Any) -> Connection:
    """``conn`` (a connection of kombu_rpc's own) made a :class:`PollingConnection`
    polling every ``interval`` seconds (``None``: as it did, or :data:`POLLING_INTERVAL`)."""
    if interval is None:
        interval = getattr(conn, "polling_interval", POLLING_INTERVAL)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval >= 0:
        raise ConfigurationError(f"polling_interval must be a number of seconds >= 0, got {interval!r}")
    conn.__class__ = PollingConnection  # kombu's Connection has no other way to carry it
    conn.polling_interval = float(interval)
    return conn


def kind(conn: Connection) -> Kind:
    """How kombu_rpc drives ``conn`` (a connection from :func:`open_connection`)."""
    transport = conn.transport
    if transport.driver_type == "amqp":
        return Kind.AMQP
    if transport.driver_type == "redis":
        return Kind.REDIS
    if hasattr(transport, "wake"):  # kombu_rpc's memory transport
        return Kind.MEMORY
    return Kind.POLLING


def unread(connection: Any) -> bool:
    """True if the py-amqp ``connection`` holds received bytes that ``select()`` on its
    socket cannot see: a whole frame in the read-ahead buffer of
    :class:`kombu_rpc._transports.amqp.BufferedTCPTransport`, or decrypted bytes in a
    TLS socket."""
    transport = connection.transport
    frame_ready = getattr(transport, "frame_ready", None)
    if frame_ready is not None:
        return bool(frame_ready())
    pending = getattr(transport.sock, "pending", None)
    return bool(pending is not None and pending())


def start_listening(conn: Connection, channel: Any, timeout: float) -> None:
    """Poll ``conn`` until ``channel``'s consumers of fanout queues are subscribed, on
    kombu_rpc's Redis transport (see :meth:`kombu_rpc._transports.redis.Channel.listening`);
    at once on other transports, where consuming starts with the consumer. Messages
    that come meanwhile go to their consumers' callbacks, as in any poll.

    Raises:
        TimeoutError: The subscriptions were not confirmed within ``timeout`` seconds
            (an ``OSError``, a connection error: Redis is unreachable or stalled).
    """
    listening = getattr(channel, "listening", None)
    if listening is None:
        return
    deadline = monotonic() + timeout
    while not listening():
        if monotonic() >= deadline:
            raise TimeoutError(f"Redis did not confirm the fanout subscriptions within {timeout}s")
        try:
            conn.drain_events(timeout=0.05)
        except TimeoutError:
            pass


class Lease(Protocol):
    """A server's (or proxy's) lease on its own queues (see :func:`lease`)."""

    def due(self) -> bool:
        """True when the lease is to be renewed."""

    def renew(self, channel: Any) -> None:
        """Renew the lease, bind again its queues if they were swept, and sweep the
        leases that ran out."""

    def release(self, channel: Any) -> None:
        """Give the lease up (once its queues were deleted)."""


def lease(
    conn: Connection,
    channel: Any,
    holder_id: str,
    queues: Sequence[Queue],
    sweeps: bool = True,
    role: str = "server",
) -> Lease | None:
    """The lease of server (or proxy, the ``role``) ``holder_id`` on its own ``queues``,
    declared on ``channel``, on Redis (:mod:`kombu_rpc._transports.leases`): its holder
    renews it on that channel when it is due (with ``sweeps``, sweeping the leases that
    ran out), and releases it once the queues were deleted. ``None`` on the other
    transports, whose brokers delete exclusive queues with their connection (or which
    live in one process), and where leases cannot work."""
    if kind(conn) is not Kind.REDIS:
        return None
    from . import leases

    return leases.Lease(holder_id, queues, sweeps, role) if leases.usable(channel) else None


def close_channel(channel: Any, errors: tuple[type[BaseException], ...]) -> None:
    """Close a channel of a connection that may be lost; ``errors`` (the connection's)
    are swallowed, as a broken channel is only closed to free it.

    A kombu Redis channel whose ``close()`` failed on a lost connection is left
    half-closed, still registered in the poller its transport shares with the channel
    that replaces it, which then never reads a message: it is abandoned
    (``kombu_rpc._transports.redis.abandon``).
    """
    try:
        channel.close()
    except errors:
        if getattr(channel, "connection", None) is None:
            return  # closed after all
        from kombu.transport import redis as kombu_redis

        if isinstance(channel, kombu_redis.Channel):
            from .redis import abandon

            abandon(channel)
