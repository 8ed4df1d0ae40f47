"""The settings of the proxies and of the server, each checked once, in one place.

:class:`~kombu_rpc.proxy.RPCProxy` and :class:`~kombu_rpc.aio.AsyncRPCProxy` build a
:class:`ProxyOptions` from their keyword arguments, and
:class:`~kombu_rpc.server.RPCServer` a :class:`ServerOptions`: the fields are those
arguments, with the same names, defaults and order. Both are frozen dataclasses that
check every value when they are made, raising
:class:`~kombu_rpc.errors.ConfigurationError`, and hold them normalised (a ``str``
secret as bytes, the retry policy merged with
:data:`~kombu_rpc.connection.DEFAULT_RETRY_POLICY`, ``codec=None`` as
:class:`~kombu_rpc.codecs.Envelope`, ...), so a copy made with
``dataclasses.replace`` is checked again and normalises to the same values.

Neither knows the broker: what depends on it (``direct_reply_to`` needs RabbitMQ) is
checked when the connection's transport is known.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import protocol
from .codecs import Codec, check_codec
from .connection import merge_retry_policy
from .errors import ConfigurationError
from .registry import Registry, default_registry
from .topology import DEFAULT_QUEUE, check_queue_name

__all__ = ["ProxyOptions", "ServerOptions", "QUEUE_TYPES", "check_timeout", "check_flag"]

#: Values of :attr:`ServerOptions.queue_type`.
QUEUE_TYPES = ("classic", "quorum")


def check_timeout(timeout: object, name: str = "timeout") -> float | None:
    """``timeout`` as a float, or ``None`` (wait forever); ``name`` names it in the error.

    Raises:
        ConfigurationError: It is not a positive number or ``None``.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigurationError(f"{name} must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)


def check_flag(name: str, value: object) -> bool:
    """``value``, which must be ``True`` or ``False``.

    Raises:
        ConfigurationError: It is not a bool.
    """
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, got {value!r}")
    return value


def _check_positive_int(name: str, value: object, or_none: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive integer or None" if or_none else "a positive integer"
        raise ConfigurationError(f"{name} must be {allowed}, got {value!r}")


def _set(options: object, name: str, value: object) -> None:
    """Store a normalised value in a frozen dataclass, from its ``__post_init__``."""
    object.__setattr__(options, name, value)


@dataclass(frozen=True)
class ProxyOptions:
    """The settings of :class:`~kombu_rpc.proxy.RPCProxy` and
    :class:`~kombu_rpc.aio.AsyncRPCProxy`, as their arguments of the same names
    (see :class:`~kombu_rpc.proxy.RPCProxy` for each).

    Raises:
        ConfigurationError: A value is invalid.
    """

    #: The request queue the server consumes.
    queue: str = DEFAULT_QUEUE
    #: Seconds to wait for each reply (``None``: wait forever); a float once checked.
    timeout: float | None = 30.0
    #: Serializer for requests.
    serializer: str = "json"
    #: Overrides of :data:`~kombu_rpc.connection.DEFAULT_RETRY_POLICY`; once checked,
    #: the whole policy.
    retry_policy: Mapping[str, Any] | None = None
    #: On AMQP, publisher confirms and ``mandatory`` requests.
    confirm_publish: bool = True
    #: The signing key (``None``: unsigned); bytes once checked.
    secret: str | bytes | None = field(default=None, repr=False)
    #: The wire format; :class:`~kombu_rpc.codecs.Envelope` for ``None``.
    codec: Codec | None = None
    #: On RabbitMQ, replies through direct reply-to.
    direct_reply_to: bool = False
    #: The calls are safe to run twice.
    retry: bool = False
    #: Fail a call after this many seconds without any message about it (``None``:
    #: never); servers send keepalives meanwhile. A float once checked.
    idle_timeout: float | None = None

    def __post_init__(self) -> None:
        _set(self, "queue", check_queue_name(self.queue))
        _set(self, "timeout", check_timeout(self.timeout))
        _set(self, "idle_timeout", check_timeout(self.idle_timeout, "idle_timeout"))
        _set(self, "retry", check_flag("retry", self.retry))
        protocol.check_serializer(self.serializer)
        _set(self, "retry_policy", merge_retry_policy(self.retry_policy))
        _set(self, "secret", protocol.secret_bytes(self.secret))
        _set(self, "codec", check_codec(self.codec))


@dataclass(frozen=True)
class ServerOptions:
    """The settings of :class:`~kombu_rpc.server.RPCServer`, as its arguments of the
    same names (see :class:`~kombu_rpc.server.RPCServer` for each). They are also the
    Celery configuration keys :data:`kombu_rpc.contrib.celery.SERVER_OPTIONS`.

    Raises:
        ConfigurationError: A value is invalid.
    """

    #: The functions to serve; :data:`~kombu_rpc.registry.default_registry` for ``None``.
    registry: Registry | None = None
    #: The request queue to consume.
    queue: str = DEFAULT_QUEUE
    #: How many calls run at once.
    concurrency: int = 1
    #: Requests taken from the broker ahead, per call that runs: the prefetch count is
    #: ``concurrency * prefetch_multiplier``.
    prefetch_multiplier: int = 1
    #: Serializers accepted for requests; a frozenset once checked.
    accept: Collection[str] = ("json",)
    #: Whether error replies carry the server-side traceback.
    send_tracebacks: bool = True
    #: Largest request body, in bytes, decoded (``None``: no limit).
    max_message_size: int | None = 10 * 1024 * 1024
    #: Declare the request queue durable (always, for a quorum queue).
    durable: bool = False
    #: ``"classic"`` or ``"quorum"`` (also when ``queue_arguments`` ask for a quorum queue).
    queue_type: str = "classic"
    #: Broker arguments for declaring the request queue.
    queue_arguments: dict[str, Any] | None = None
    #: Overrides of :data:`~kombu_rpc.connection.DEFAULT_RETRY_POLICY`; once checked,
    #: the whole policy.
    retry_policy: Mapping[str, Any] | None = None
    #: On AMQP, publish replies with publisher confirms.
    confirm_publish: bool = True
    #: The signing key (``None``: unsigned); bytes once checked.
    secret: str | bytes | None = field(default=None, repr=False)
    #: The wire format; :class:`~kombu_rpc.codecs.Envelope` for ``None``.
    codec: Codec | None = None

    def __post_init__(self) -> None:
        registry, accept = self.registry, self.accept
        if registry is not None and not isinstance(registry, Registry):
            raise ConfigurationError(f"registry must be a kombu_rpc.Registry or None, got {registry!r}")
        _check_positive_int("concurrency", self.concurrency)
        _check_positive_int("prefetch_multiplier", self.prefetch_multiplier)
        if isinstance(accept, str) or not accept:
            raise ConfigurationError(f"accept must be a non-empty list of serializer names, got {accept!r}")
        for name in accept:
            protocol.check_serializer(name)
        _set(self, "registry", default_registry if registry is None else registry)
        _set(self, "queue", check_queue_name(self.queue))
        _set(self, "accept", frozenset(accept))
        if self.max_message_size is not None:
            _check_positive_int("max_message_size", self.max_message_size, or_none=True)
        queue_type, durable, queue_arguments = self.queue_type, self.durable, self.queue_arguments
        if queue_type not in QUEUE_TYPES:
            raise ConfigurationError(f"queue_type must be one of {QUEUE_TYPES}, got {queue_type!r}")
        if queue_arguments is not None and not isinstance(queue_arguments, dict):
            raise ConfigurationError(f"queue_arguments must be a dict or None, got {queue_arguments!r}")
        declared_type = (queue_arguments or {}).get("x-queue-type", queue_type)
        if queue_type == "quorum" and declared_type != "quorum":
            raise ConfigurationError(
                f"queue_type='quorum' contradicts queue_arguments' x-queue-type {declared_type!r}"
            )
        if declared_type == "quorum":  # RabbitMQ refuses a quorum queue that is not durable
            queue_type, durable = "quorum", True
            queue_arguments = {**(queue_arguments or {}), "x-queue-type": "quorum"}
        _set(self, "durable", durable)
        _set(self, "queue_type", queue_type)
        _set(self, "queue_arguments", queue_arguments)
        _set(self, "retry_policy", merge_retry_policy(self.retry_policy))
        _set(self, "secret", protocol.secret_bytes(self.secret))
        _set(self, "codec", check_codec(self.codec))
