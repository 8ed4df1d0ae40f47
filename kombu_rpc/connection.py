"""Opening connections: broker URL or ``kombu.Connection`` in, a private connection out."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from kombu import Connection, Producer
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from ._transports import Kind, kind, open_connection
from .errors import ConfigurationError

logger = logging.getLogger(__name__)

#: The environment variable holding the broker URL of servers, proxies and the
#: ``kombu-rpc`` command when they are given none.
BROKER_URL_ENV = "KOMBU_RPC_BROKER_URL"

#: The type of a broker argument, a URL such as ``"amqp://guest:guest@127.0.0.1//"``
#: or a :class:`kombu.Connection` (cloned, never used directly).
Broker: TypeAlias = str | Connection

#: How often to retry connecting and publishing before giving up, in the keywords of
#: kombu's ``Connection.ensure_connection`` and ``Producer.publish(retry_policy=...)``.
DEFAULT_RETRY_POLICY: dict[str, Any] = {
    "max_retries": 3,
    "interval_start": 0.1,
    "interval_step": 0.4,
    "interval_max": 1.0,
}
#: Longest one publish may block (writing, then waiting for the broker's confirm)
#: before its connection counts as lost. A call with a shorter timeout uses its own.
PUBLISH_TIMEOUT = 10.0


def connect(broker: Broker | None) -> Connection:
    """Return a new, not yet connected :class:`kombu.Connection` for ``broker``, on the
    transport kombu_rpc uses for its URL (see ``kombu_rpc._transports``). ``broker``
    itself is never changed; ``None`` takes the URL in the environment variable
    :data:`BROKER_URL_ENV`. The URLs of a ``;``-separated list are tried in a random
    order, and ``amqp`` URLs ask for heartbeats
    (``kombu_rpc._transports.open_connection``).

    Raises:
        ConfigurationError: ``broker`` is not a URL or a Connection (or ``None`` with
            :data:`BROKER_URL_ENV` unset), or names an unknown transport, or one whose
            client library is not installed.
    """
    if broker is None:
        broker = os.environ.get(BROKER_URL_ENV, "").strip()
        if not broker:
            raise ConfigurationError(
                f"no broker: pass one, such as 'amqp://guest:guest@127.0.0.1//', or set {BROKER_URL_ENV}"
            )
    if not isinstance(broker, (str, Connection)) or not broker:
        raise ConfigurationError(
            f"broker must be a URL such as 'amqp://guest:guest@127.0.0.1//' "
            f"or a kombu.Connection, got {broker!r}"
        )
    if isinstance(broker, str) and "://" not in broker:
        raise ConfigurationError(
            f"broker URL {broker!r} has no scheme: write it as 'amqp://{broker}//', 'redis://{broker}/0', ..."
        )
    try:
        return open_connection(broker)
    except ConfigurationError:
        raise
    except (KeyError, ImportError, ValueError) as exc:
        raise ConfigurationError(f"unknown or unavailable transport in {broker!r}: {exc}") from exc


def publishing_clone(conn: Connection, confirm: bool) -> Connection:
    """A clone of ``conn`` for publishing; with publisher confirms on AMQP if ``confirm``.

    With confirms, ``publish`` returns only once the broker took the message, and an
    unroutable ``mandatory`` message raises instead of vanishing. Other transports
    have no confirms; their clone is plain.

    The AMQP clone asks for no heartbeats: it is used now and then by a thread that
    never calls ``heartbeat_check``, so the broker would close it while it is idle.
    """
    if kind(conn) is Kind.AMQP:
        options = {**conn.transport_options, "confirm_publish": True} if confirm else conn.transport_options
        return conn.clone(transport_options=options, heartbeat=0)
    return conn.clone()


def publish(producer: Producer, retry_policy: dict[str, Any] | None, **kwargs: Any) -> None:
    """``producer.publish(**kwargs)``, retried through kombu's ``retry=True`` (with
    ``retry_policy``; ``None``: never) once a first attempt hit a recoverable connection
    error.

    The first attempt goes without ``retry``, which would wrap every message in a fresh
    ``Connection.ensure`` closure; a failed one is redone by kombu's retry, which
    reconnects and publishes again.
    """
    try:
        producer.publish(**kwargs)
    except producer.connection.recoverable_connection_errors:
        if retry_policy is None:
            raise
        producer.publish(retry=True, retry_policy=retry_policy, **kwargs)


def broker_errors(
    conn: Connection,
    *,
    connection: bool = True,
    channel: bool = True,
    operational: bool = False,
    os_errors: bool = False,
) -> tuple[type[BaseException], ...]:
    """The exceptions that mean the broker failed ``conn`` (a :class:`kombu.Connection`),
    for an ``except`` clause: its transport's ``connection_errors`` and
    ``channel_errors``, kombu's ``OperationalError`` (what ``ensure`` raises once its
    retries are spent) and ``OSError`` (a socket), each as asked for.

    Args:
        conn: The connection whose transport's errors are meant.
        connection: Include the transport's ``connection_errors``.
        channel: Include the transport's ``channel_errors``.
        operational: Include :class:`kombu.exceptions.OperationalError`.
        os_errors: Include :class:`OSError`.
    """
    errors: tuple[type[BaseException], ...] = ()
    if connection:
        errors += tuple(conn.connection_errors)
    if channel:
        errors += tuple(conn.channel_errors)
    if operational:
        errors += (OperationalError,)
    if os_errors:
        errors += (OSError,)
    return errors


def take_confirmed(unconfirmed: dict[int, Any], delivery_tag: int, multiple: bool) -> list[Any]:
    """Remove and return what a publisher confirm (``basic.ack`` or ``basic.nack``)
    covers: the entry for ``delivery_tag``, or with ``multiple`` every entry up to it.
    ``unconfirmed`` maps a channel's delivery tags to what was published under them."""
    if not multiple:
        entry = unconfirmed.pop(delivery_tag, None)
        return [] if entry is None else [entry]
    return [unconfirmed.pop(tag) for tag in [tag for tag in unconfirmed if tag <= delivery_tag]]


def reconnect(conn: Connection, retry_policy: dict[str, Any], callback: Callable[[], None]) -> None:
    """Re-establish ``conn`` after a connection error, retrying with backoff (capped at
    the policy's ``interval_max``) until it succeeds or ``callback`` raises.

    py-amqp leaves a dead connection's socket open (a ``ResourceWarning`` later), so on
    AMQP ``collect()`` first closes it without talking to the broker. Virtual transports
    (Redis, memory) reconnect in place, and their ``collect()`` closes channels with
    broker I/O, which can block on a dead Redis connection, so they are left alone.
    """
    if kind(conn) is Kind.AMQP:
        conn.collect()
    conn.ensure_connection(
        errback=_log_retry,
        max_retries=None,
        interval_start=0.1,
        interval_step=0.5,
        interval_max=retry_policy["interval_max"],
        callback=callback,
    )


def _log_retry(exc: Exception, interval: float) -> None:
    logger.warning("cannot reconnect (%s); retrying in %.1fs", exc, interval)


class Heartbeater:
    """Sends the heartbeats of an AMQP connection while the thread that owns it is away.

    A py-amqp connection sends heartbeats only when its owner calls
    ``heartbeat_check``, as a server's consuming thread does between two requests, but
    not while it runs a remote function itself (``concurrency=1``): after two silent
    heartbeat intervals the broker would close the connection and deliver the request
    again. Between :meth:`away` and :meth:`back`, a thread of the heartbeater's own
    writes a heartbeat frame on the connection :meth:`bind` gave it whenever nothing
    was written for a quarter of the heartbeat interval (every half interval at most,
    as py-amqp's ``heartbeat_check`` does).

    The owner does no I/O on the connection while away, and :meth:`back` returns only
    once no frame is being written, so two threads never write at once (py-amqp 5.1's
    frame writer is not safe across threads). The owner does not read while away
    either: the broker's heartbeats wait in the socket, and each tick makes py-amqp
    count them as received, so that the owner's next ``heartbeat_check`` does not
    find them missing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held by the thread while it looks or writes
        self._changed = threading.Condition(self._lock)
        self._connection: Any = None
        self._away = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def bind(self, connection: Any) -> None:
        """Beat for ``connection``, a connected py-amqp connection (the new one after
        each reconnect); starts the thread on first use."""
        with self._lock:
            self._connection = connection
            self._changed.notify()
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="kombu_rpc-heartbeat", daemon=True)
                self._thread.start()

    def away(self) -> None:
        """The owner leaves the connection alone (no reads, no writes) until :meth:`back`."""
        self._away = True

    def back(self) -> None:
        """The owner uses the connection again (once a heartbeat being written is whole)."""
        with self._lock:
            self._away = False

    def close(self) -> None:
        """Stop the thread (waiting for it at most :data:`PUBLISH_TIMEOUT`)."""
        with self._lock:
            self._closed = True
            self._connection = None
            self._changed.notify()
            thread = self._thread
        if thread is not None:
            thread.join(PUBLISH_TIMEOUT)

    def _run(self) -> None:
        sent_before = None  # the connection's frame count at the previous tick
        with self._lock:
            while not self._closed:
                connection = self._connection
                interval = getattr(connection, "heartbeat", None) or 0
                if not interval:  # unbound, or no heartbeats negotiated
                    self._changed.wait()
                    sent_before = None
                    continue
                self._changed.wait(interval / 4)
                if self._connection is not connection:
                    sent_before = None
                    continue
                sent = connection.bytes_sent
                if self._away:
                    if sent == sent_before and not self._beat(connection):
                        self._connection = None  # broken: the owner finds out at its next I/O
                        continue
                    sent = connection.bytes_sent
                    connection.prev_recv = None  # whatever came meanwhile counts as heard now
                sent_before = sent

    def _beat(self, connection: Any) -> bool:
        """Write one heartbeat frame (within :data:`PUBLISH_TIMEOUT`); False if the
        connection is closed or the write failed."""
        try:
            if not connection.connected:
                return False
            with connection.transport.having_timeout(PUBLISH_TIMEOUT):
                connection.send_heartbeat()
        except Exception as exc:
            logger.debug("could not send a heartbeat: %s", exc)
            return False
        return True


def safe_uri(conn: Connection) -> str:
    """The connection's URL with the password masked, for logs, errors and banners
    (``redis://127.0.0.1:6379/0`` when it has none, ``memory://`` for memory).

    kombu writes a transport given as a class (kombu_rpc's own memory:// and amqp://
    transports) as the class's repr; the URL shows its driver type instead.
    """
    if kind(conn) is Kind.MEMORY:
        return "memory://"
    uri = str(conn.as_uri())
    transport_cls = conn.transport_cls
    if isinstance(transport_cls, type):
        uri = uri.replace(str(transport_cls), str(getattr(transport_cls, "driver_type", "")), 1)
    scheme, _, rest = uri.partition("://")
    if rest.startswith(":**@") and not conn.password:  # no user, no password: nothing to mask
        uri = f"{scheme}://{rest[4:]}"
    return str(maybe_sanitize_url(uri))  # a URL the transport parses itself (sqla+...) shows as given


def merge_retry_policy(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """:data:`DEFAULT_RETRY_POLICY` updated with ``overrides``; rejects unknown keys."""
    policy = dict(DEFAULT_RETRY_POLICY)
    if overrides is not None:
        unknown = set(overrides) - set(DEFAULT_RETRY_POLICY)
        if unknown:
            raise ConfigurationError(
                f"unknown retry_policy keys {sorted(unknown)}; allowed: {sorted(DEFAULT_RETRY_POLICY)}"
            )
        policy.update(overrides)
    return policy
