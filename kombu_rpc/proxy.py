"""RPCProxy: attribute access turned into remote calls (owns no broker code)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from types import TracebackType
from typing import Any, TypeVar, cast

from ._client import BroadcastReply, Client
from .codecs import Codec
from .connection import Broker, connect
from .errors import ConfigurationError, RemoteError, RPCTimeout
from .interfaces import interface_methods, mismatches, typed_view
from .options import ProxyOptions, check_timeout
from .protocol import NAME_PATTERN
from .registry import RESERVED_PREFIX
from .topology import DEFAULT_QUEUE

_T = TypeVar("_T")
_UNSET: Any = object()
#: Seconds past a call's timeout after which a blocking call stops waiting regardless.
_GUARD = 1.0
logger = logging.getLogger(__name__)


class RPCProxy:
    """Calls functions served by an :class:`~kombu_rpc.RPCServer`.

    Attribute access builds a :class:`MethodProxy`; calling it sends a request and
    waits for the reply. The proxy connects on first use, owns one reply queue, and is
    safe to share between threads.

    Args:
        broker: Broker URL or :class:`kombu.Connection` (cloned, not used directly);
            ``None``: the URL in the ``KOMBU_RPC_BROKER_URL`` environment variable.
        queue: The request queue the server consumes.
        timeout: Seconds to wait for each reply (``None``: wait forever).
        serializer: Serializer for requests; replies come back in the same one.
        retry_policy: Overrides for connecting and publishing retries (keys of
            :data:`kombu_rpc.connection.DEFAULT_RETRY_POLICY`).
        confirm_publish: On AMQP, publish with publisher confirms and ``mandatory``:
            a request the broker did not take raises, and a request to a queue that
            does not exist raises :class:`~kombu_rpc.errors.NoServerError` at once.
        secret: Sign every request with this key (HMAC-SHA256 over the body, the
            routing properties and a timestamp), for servers created with the same
            ``secret``, and refuse replies not signed with it. At least 16 bytes.
        codec: The wire format, as the server's (:mod:`kombu_rpc.codecs`).
            ``Plain()`` calls the RabbitMQ tutorial's servers: ``proxy.fib(30)``
            sends ``"30"``.
        direct_reply_to: On RabbitMQ, receive replies through RabbitMQ's direct
            reply-to (``amq.rabbitmq.reply-to``) instead of a reply queue of the
            proxy's own; see :doc:`/performance` for when it pays off.
        retry: The calls are safe to run twice. On RabbitMQ a lost connection
            takes the reply queue with it: a call in flight then fails at once with
            :class:`~kombu_rpc.errors.ConnectionLostError` (its request may have
            run), unless ``retry``, when its request is published again. See
            :doc:`/reliability`.

    Example:
        >>> with RPCProxy("memory://", queue="rpc_queue") as proxy:  # doctest: +SKIP
        ...     proxy.fib(30)
        832040

    Note:
        Remote names that clash with the proxy's own attributes (``options``,
        ``typed``, ``check_interface``, ``close``, ``queue``, ``timeout``,
        ``reply_queue``) or with ``call_async`` and ``cast`` are reached by item
        access: ``proxy["close"]()``.
    """

    def __init__(
        self,
        broker: Broker | None = None,
        queue: str = DEFAULT_QUEUE,
        timeout: float | None = 30.0,
        serializer: str = "json",
        retry_policy: dict[str, Any] | None = None,
        confirm_publish: bool = True,
        secret: str | bytes | None = None,
        codec: Codec | None = None,
        direct_reply_to: bool = False,
        retry: bool = False,
    ) -> None:
        options = ProxyOptions(
            queue=queue,
            timeout=timeout,
            serializer=serializer,
            retry_policy=retry_policy,
            confirm_publish=confirm_publish,
            secret=secret,
            codec=codec,
            direct_reply_to=direct_reply_to,
            retry=retry,
        )
        self._bind(Client(connect(broker), options), options, owner=True)

    @classmethod
    def _from_options(cls, broker: Broker | None, options: ProxyOptions) -> RPCProxy:
        """A proxy with these (checked) options: :class:`RPCProxy` ``(broker, **options)``."""
        proxy = cls.__new__(cls)
        proxy._bind(Client(connect(broker), options), options, owner=True)
        return proxy

    def _bind(self, client: Client, options: ProxyOptions, owner: bool) -> None:
        self._client = client
        self._options = options
        self._queue = options.queue
        self._timeout = options.timeout
        self._retry = options.retry
        self._owner = owner  # closing closes the client (not a view's)

    def options(self, *, timeout: float | None = _UNSET, retry: bool = _UNSET) -> RPCProxy:
        """Return a view of this proxy with per-call options overridden.

        The view shares the reply queue and connections; it is closed with this proxy.

        Args:
            timeout: Seconds to wait for each reply (``None``: wait forever). Omit to
                keep this proxy's timeout.
            retry: Whether the calls are safe to run twice (see :class:`RPCProxy`).
                Omit to keep this proxy's.

        Raises:
            ConfigurationError: ``timeout`` is not a positive number or ``None``, or
                ``retry`` not a bool.
        """
        changes: dict[str, Any] = {}
        if timeout is not _UNSET:
            changes["timeout"] = timeout
        if retry is not _UNSET:
            changes["retry"] = retry
        view = type(self).__new__(type(self))
        view._bind(self._client, dataclasses.replace(self._options, **changes), owner=False)
        return view

    def typed(self, interface: Callable[..., _T], *, prefix: str = "") -> _T:
        """Return a view of this proxy that type checkers see as ``interface``.

        ``interface`` is a class (most often a :class:`typing.Protocol`) whose
        methods declare the remote functions: ``proxy.typed(Math).add(1, 2)`` calls
        the remote ``add``, and mypy checks its arguments and result against
        ``Math.add``. :func:`kombu_rpc.call_async` starts a call typed the same way.
        The view shares this proxy's options and reply queue; an attribute the
        interface does not declare raises :class:`AttributeError`.

        Args:
            interface: The class declaring the remote functions with ``def``.
            prefix: Dotted prefix of the remote names: with ``prefix="math"``,
                ``add`` calls ``math.add``.

        Raises:
            ConfigurationError: ``interface`` is not a class, declares no method, or
                declares one ``async def`` (that is :meth:`AsyncRPCProxy.typed
                <kombu_rpc.aio.AsyncRPCProxy.typed>`'s kind), or ``prefix`` is not a
                dotted name.
        """
        return cast(_T, typed_view(interface, prefix, False, self.__getitem__))

    def check_interface(self, interface: Callable[..., Any], *, prefix: str = "") -> None:
        """Ask a server of the queue (``kombu_rpc.describe``) whether it serves every
        method of ``interface``, with the same parameters (names, kinds and which
        have defaults; annotations are not compared).

        Raises:
            ConfigurationError: A method is not served, or its parameters differ;
                the message lists each difference. Also as :meth:`typed`.
            RPCTimeout: No server answered within the proxy's timeout.
        """
        methods = interface_methods(interface, prefix, asynchronous=False)
        found = mismatches(methods, self[f"{RESERVED_PREFIX}describe"]())
        if found:
            raise ConfigurationError(_not_as_declared(interface, self._queue, found))

    @property
    def queue(self) -> str:
        """The request queue this proxy publishes to."""
        return self._queue

    @property
    def timeout(self) -> float | None:
        """Seconds each call waits for its reply, or None to wait forever."""
        return self._timeout

    @property
    def reply_queue(self) -> str:
        """The name of this proxy's reply queue."""
        return self._client.reply_queue

    def close(self) -> None:
        """Delete the reply queue and close the connections; calls still waiting fail
        with :class:`~kombu_rpc.errors.CallError`. A view from :meth:`options` is
        closed with the proxy that made it; closing the view does nothing."""
        if self._owner:
            self._client.close()

    def __enter__(self) -> RPCProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __getattr__(self, name: str) -> MethodProxy:
        if name.startswith("_"):
            raise AttributeError(name)
        return MethodProxy(self, name)

    def __getitem__(self, name: str) -> MethodProxy:
        return MethodProxy(self, name)

    def __repr__(self) -> str:
        return f"<RPCProxy queue={self._queue!r} timeout={self._timeout}>"


class MethodProxy:
    """One remote function, reached as ``proxy.name`` or ``proxy["dotted.name"]``.

    Calling it blocks for the result; :meth:`call_async` returns a future and
    :meth:`cast` sends without waiting. Attribute access extends a dotted name:
    ``proxy.math.add`` is ``proxy["math.add"]``.
    """

    def __init__(self, proxy: RPCProxy, name: str) -> None:
        self._proxy = proxy
        self._name = name

    def __getattr__(self, name: str) -> MethodProxy:
        if name.startswith("_"):
            raise AttributeError(name)
        return MethodProxy(self._proxy, f"{self._name}.{name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the remote function and return its result.

        Raises:
            RemoteError: The remote function raised (or the call was refused).
            RPCTimeout: No reply within the proxy's timeout.
            ConnectionLostError: The broker could not be reached.
            SerializationError: The arguments cannot be encoded.
        """
        __tracebackhide__ = True  # pytest: a remote error's frames here are no news
        proxy = self._proxy
        timeout = proxy._timeout
        client = proxy._client
        future = client.call(
            proxy._queue, self._checked_name(), args, kwargs, timeout, attended=True, retry=proxy._retry
        )
        # This thread reads replies until the call's deadline, when the client fails
        # the call; waiting a little longer for that is a guard against a hang.
        client.wait(future, timeout)
        if not future.done():
            try:
                future.exception(_GUARD)
            except FuturesTimeout:
                assert timeout is not None
                logger.error("call to %r outlived its deadline by %ss; failing it", self._name, _GUARD)
                raise RPCTimeout(self._name, timeout) from None
        try:
            return future.result()
        except RemoteError as exc:  # the frames that read its reply are no news to the caller
            raise exc.with_traceback(None) from None

    def call_async(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """Send the call and return a :class:`concurrent.futures.Future` of its result.

        The future fails with :class:`~kombu_rpc.RPCTimeout` at the deadline even if
        nobody waits on it. ``future.cancel()`` cancels the call: the future fails with
        :class:`concurrent.futures.CancelledError` at once, and the server running the
        call is told to stop it, or one that has yet to take the request drops it (see
        :doc:`/cancellation`). Calls made by calling the proxy cannot be cancelled.
        """
        proxy = self._proxy
        return proxy._client.call(
            proxy._queue, self._checked_name(), args, kwargs, proxy._timeout, retry=proxy._retry
        )

    def cast(self, *args: Any, **kwargs: Any) -> None:
        """Send the call without asking for a reply (fire and forget); returns ``None``.

        The server runs it and logs any error.
        """
        proxy = self._proxy
        proxy._client.cast(proxy._queue, self._checked_name(), args, kwargs)

    def broadcast(
        self, *args: Any, timeout: float = 1.0, expect: int | None = None, **kwargs: Any
    ) -> list[BroadcastReply]:
        """Call the function on every server of the proxy's queue at once, and return
        the replies that arrive within ``timeout`` seconds, one per server, in the order
        they arrived. Use it for health checks, cache resets or config reloads.

        The request goes through the queue's fanout exchange to a queue each server
        binds to it, not through the shared request queue. A server that fails answers
        with a :class:`~kombu_rpc.BroadcastReply` whose ``error`` is set. With no
        server running the list is empty (at once on AMQP).

        Args:
            timeout: Seconds to wait for replies; the call always waits this long
                unless ``expect`` replies arrive first. ``timeout`` and ``expect`` are
                the broadcast's own keywords: pass a remote argument of either name
                by position.
            expect: Return as soon as this many replies arrived.

        Raises:
            ConnectionLostError: The request could not be sent within ``timeout``.
        """
        window = check_timeout(timeout)
        if window is None:
            raise ConfigurationError("a broadcast needs a timeout: it cannot tell when all servers answered")
        if expect is not None and (isinstance(expect, bool) or not isinstance(expect, int) or expect < 1):
            raise ConfigurationError(f"expect must be a positive integer or None, got {expect!r}")
        proxy = self._proxy
        return proxy._client.broadcast(proxy._queue, self._checked_name(), args, kwargs, window, expect)

    def _checked_name(self) -> str:
        if not NAME_PATTERN.fullmatch(self._name):
            raise ConfigurationError(
                f"invalid remote name {self._name!r}: remote names are dotted identifiers "
                "whose parts do not start with '_'"
            )
        return self._name

    def __repr__(self) -> str:
        return f"<MethodProxy {self._name!r} on {self._proxy.queue!r}>"


def _not_as_declared(interface: Callable[..., Any], queue: str, found: list[str]) -> str:
    name = getattr(interface, "__name__", repr(interface))
    return f"the server on {queue!r} does not serve {name} as declared: " + "; ".join(found)
