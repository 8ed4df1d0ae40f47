"""RPCProxy: attribute access turned into remote calls (owns no broker code)."""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from time import monotonic
from types import TracebackType
from typing import Any, TypeVar, cast

from ._client import BroadcastReply, Client
from ._pending import CallParts
from .codecs import Codec
from .connection import Broker, connect
from .errors import ConfigurationError, IdleTimeout, RemoteError, RPCTimeout
from .interfaces import interface_methods, mismatches, typed_view
from .options import ProxyOptions, check_timeout
from .protocol import NAME_PATTERN, Wants, keepalive_for
from .registry import RESERVED_PREFIX
from .topology import DEFAULT_QUEUE, new_id

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
        idle_timeout: Fail a call with :class:`~kombu_rpc.errors.IdleTimeout` once
            nothing was heard about it (no stream item, progress, keepalive or reply)
            for this many seconds; servers send keepalives to such calls while they
            run. ``None``: no idle timeout. See :doc:`/streaming`.

    Example:
        >>> with RPCProxy("memory://", queue="rpc_queue") as proxy:  # doctest: +SKIP
        ...     proxy.fib(30)
        832040

    Note:
        Remote names that clash with the proxy's own attributes (``options``,
        ``typed``, ``check_interface``, ``close``, ``queue``, ``timeout``,
        ``reply_queue``) or with the methods of a remote function (``call_async``,
        ``map``, ``cast``, ``broadcast``, ``stream``: ``proxy.jobs.stream`` is a method, not
        the remote ``jobs.stream``) are reached by item access: ``proxy["close"]()``,
        ``proxy["jobs.stream"]()``.
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
        idle_timeout: float | None = None,
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
            idle_timeout=idle_timeout,
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
        self._idle_timeout = options.idle_timeout
        self._on_progress: Callable[[Any], None] | None = None
        self._owner = owner  # closing closes the client (not a view's)

    def options(
        self,
        *,
        timeout: float | None = _UNSET,
        retry: bool = _UNSET,
        idle_timeout: float | None = _UNSET,
        on_progress: Callable[[Any], None] | None = _UNSET,
    ) -> RPCProxy:
        """Return a view of this proxy with per-call options overridden.

        The view shares the reply queue and connections; it is closed with this proxy.

        Args:
            timeout: Seconds to wait for each reply (``None``: wait forever). Omit to
                keep this proxy's timeout.
            retry: Whether the calls are safe to run twice (see :class:`RPCProxy`).
                Omit to keep this proxy's.
            idle_timeout: Seconds without any message about a call after which it
                fails with :class:`~kombu_rpc.errors.IdleTimeout` (see
                :class:`RPCProxy`). Omit to keep this proxy's.
            on_progress: Called with each value the remote function reports with
                ``current_call().progress(value)``, in the thread that reads the
                replies (keep it short; what it raises is logged). ``None``: no
                progress is sent. Omit to keep this proxy's.

        Raises:
            ConfigurationError: ``timeout`` or ``idle_timeout`` is not a positive
                number or ``None``, ``retry`` not a bool, or ``on_progress`` not
                callable.
        """
        changes: dict[str, Any] = {}
        if timeout is not _UNSET:
            changes["timeout"] = timeout
        if retry is not _UNSET:
            changes["retry"] = retry
        if idle_timeout is not _UNSET:
            changes["idle_timeout"] = idle_timeout
        progress = self._on_progress if on_progress is _UNSET else on_progress
        if progress is not None and not callable(progress):
            raise ConfigurationError(f"on_progress must be callable or None, got {progress!r}")
        view = type(self).__new__(type(self))
        view._bind(self._client, dataclasses.replace(self._options, **changes), owner=False)
        view._on_progress = progress
        return view

    def _parts(self, method: str, stream: bool) -> tuple[Wants | None, CallParts | None]:
        """What a call asks for besides its reply, and where it receives it: ``None``
        and ``None`` for a plain call without idle timeout or progress."""
        idle, on_progress = self._idle_timeout, self._on_progress
        if not stream and idle is None and on_progress is None:
            return None, None
        wants = Wants(stream, on_progress is not None, None if idle is None else keepalive_for(idle))
        return wants, CallParts(method, idle, on_progress)

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

    Calling it blocks for the result; :meth:`call_async` returns a future, :meth:`map`
    keeps many calls in flight, :meth:`cast` sends without waiting and :meth:`stream`
    iterates over a remote generator's items. Attribute access extends a dotted name:
    ``proxy.math.add`` is ``proxy["math.add"]`` (but for the names of these methods).
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
        if proxy._idle_timeout is not None or proxy._on_progress is not None:
            return self._call_with_parts(args, kwargs)
        future = client.call(
            proxy._queue, self._checked_name(), args, kwargs, timeout, attended=True, retry=proxy._retry
        )
        try:
            return _result(client, future, timeout, timeout, self._name)
        except BaseException:  # Ctrl+C (KeyboardInterrupt) while waiting: so much for the call
            future.cancel()
            raise

    def _call_with_parts(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A blocking call with an idle timeout or a progress callback."""
        __tracebackhide__ = True
        proxy = self._proxy
        name = self._checked_name()
        wants, parts = proxy._parts(name, stream=False)
        assert parts is not None
        client, timeout = proxy._client, proxy._timeout
        future = client.call(
            proxy._queue,
            name,
            args,
            kwargs,
            timeout,
            attended=True,
            retry=proxy._retry,
            wants=wants,
            parts=parts,
        )
        deadline = None if timeout is None else monotonic() + timeout
        try:
            _wait(client, future.done, future, parts, deadline, timeout)
        except BaseException:  # interrupted while waiting (KeyboardInterrupt), or the guard fired
            future.cancel()
            raise
        return _result(client, future, 0.0, timeout, name)  # ended: its result, or its error

    def stream(self, *args: Any, **kwargs: Any) -> Stream:
        """Call a remote generator function and iterate over its items as the server
        produces them: ``for item in proxy.count.stream(10): ...``.

        The request is sent at once. The items come in order, each exactly once; the
        iteration ends when the server says the stream ended, or raises what ended it
        otherwise (after the items received before): the remote function's error as a
        :class:`~kombu_rpc.errors.RemoteError`, :class:`~kombu_rpc.errors.RPCTimeout` at
        the proxy's ``timeout`` (for the whole stream),
        :class:`~kombu_rpc.errors.IdleTimeout` after ``idle_timeout`` seconds without
        news. Closing the stream early (``close()``, leaving a ``with`` block, or
        breaking out of the ``for`` loop that holds the only reference) ends the call
        here at once. See :doc:`/streaming`.

        Raises:
            SerializationError: The arguments cannot be encoded.
            ConnectionLostError: The broker could not be reached.
            ConfigurationError: The name is not a valid remote name.
        """
        return self._start_stream(True, args, kwargs)

    def _start_stream(self, attended: bool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Stream:
        """Send a stream's request; ``attended``: the caller reads the replies."""
        proxy = self._proxy
        name = self._checked_name()
        wants, parts = proxy._parts(name, stream=True)
        assert parts is not None
        client, timeout = proxy._client, proxy._timeout
        correlation_id = new_id()
        future = client.call(
            proxy._queue,
            name,
            args,
            kwargs,
            timeout,
            attended=attended,
            retry=proxy._retry,
            wants=wants,
            parts=parts,
            correlation_id=correlation_id,
        )
        return Stream(client, proxy._queue, correlation_id, future, parts, timeout)

    def call_async(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """Send the call and return a :class:`concurrent.futures.Future` of its result.

        The future fails with :class:`~kombu_rpc.RPCTimeout` at the deadline (and with
        :class:`~kombu_rpc.errors.IdleTimeout` after the proxy's ``idle_timeout``) even
        if nobody waits on it. ``future.cancel()`` cancels the call: the future fails with
        :class:`concurrent.futures.CancelledError` at once, and the server running the
        call is told to stop it, or one that has yet to take the request drops it (see
        :doc:`/cancellation`). A call made by calling the proxy is cancelled so when
        its caller is interrupted while it waits (``KeyboardInterrupt``).
        """
        proxy = self._proxy
        name = self._checked_name()
        wants, parts = proxy._parts(name, stream=False)
        return proxy._client.call(
            proxy._queue, name, args, kwargs, proxy._timeout, retry=proxy._retry, wants=wants, parts=parts
        )

    def map(self, *iterables: Iterable[Any], window: int = 16) -> Iterator[Any]:
        """Call the function once for each set of arguments taken from ``iterables``
        (as the builtin :func:`map` pairs them), with up to ``window`` calls in flight,
        and yield the results in order: ``for n in proxy.fib.map(range(100)): ...``.

        The arguments are taken as results are: the first ``window`` requests go at
        once, then one more as each result is yielded. The calling thread publishes
        the requests and reads the replies itself, so many calls in flight cost no
        thread switch per reply (``call_async`` futures are completed by another
        thread). Each call has the proxy's ``timeout`` (counted from its request) and
        ``retry``. The first call that fails raises its error where its result would
        be (:class:`~kombu_rpc.RemoteError`, :class:`~kombu_rpc.RPCTimeout`, ...),
        after the results before it; the calls still in flight are then cancelled, as
        they are when the iteration stops early (``break``, ``close()``). So does an
        error raised by the iterables, or by sending a call
        (:class:`~kombu_rpc.SerializationError`, ...): no call after it is sent.

        Raises:
            ConfigurationError: No iterable, a ``window`` that is not a positive
                integer, or a name that is not a valid remote name.
        """
        if not iterables:
            raise ConfigurationError("map needs at least one iterable of arguments")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigurationError(f"window must be a positive integer, got {window!r}")
        # to the shortest iterable, as map() pairs them
        return self._map(self._checked_name(), zip(*iterables, strict=False), window)

    def _map(self, name: str, argsets: Iterator[tuple[Any, ...]], window: int) -> Iterator[Any]:
        """:meth:`map`'s generator, once its arguments were checked."""
        __tracebackhide__ = True
        proxy = self._proxy
        client, queue, timeout, retry = proxy._client, proxy._queue, proxy._timeout, proxy._retry
        # each call's future, and what it receives besides its reply (with its deadline)
        calls: deque[tuple[Future[Any], CallParts | None, float | None]] = deque()
        more = True
        try:
            while True:
                while more and len(calls) < window:
                    parts = deadline = None
                    try:
                        args = next(argsets, None)
                        if args is None:
                            more = False
                            break
                        wants, parts = proxy._parts(name, stream=False)
                        deadline = None if timeout is None else monotonic() + timeout
                        # A call with parts (progress, keepalives) is read for by the
                        # link's thread while this one is away; the others wait here.
                        future = client.call(
                            queue,
                            name,
                            args,
                            {},
                            timeout,
                            attended=True,
                            retry=retry,
                            wants=wants,
                            parts=parts,
                            awaited=parts is None,
                        )
                    except Exception as exc:
                        # the iterables' error, or the call's (its arguments cannot be
                        # encoded, the broker cannot be reached): raised in its turn
                        future = Future()
                        future.set_exception(exc)
                        more = False
                    calls.append((future, parts, deadline))
                if not calls:
                    return
                future, parts, deadline = calls[0]
                if parts is not None:
                    _wait(client, future.done, future, parts, deadline, timeout)
                left = None if deadline is None else max(0.0, deadline - monotonic())
                result = _result(client, future, left, timeout, name)
                calls.popleft()
                yield result
        finally:
            for future, _, _ in calls:
                future.cancel()

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


class Stream:
    """The items of a remote generator, as they arrive: an iterator returned by
    :meth:`MethodProxy.stream`, and a context manager that closes it.

    Iterating reads the replies in the calling thread while it waits. Closing the
    stream before its end (:meth:`close`, leaving its ``with`` block, or dropping the
    last reference to it, as breaking out of a ``for`` loop over
    ``proxy.f.stream(...)`` does) ends the call here at once; items that arrive later
    are dropped.
    """

    def __init__(
        self,
        client: Client,
        queue: str,
        correlation_id: str,
        future: Future[Any],
        parts: CallParts,
        timeout: float | None,
    ) -> None:
        self._client = client
        self._queue = queue
        self._correlation_id = correlation_id
        self._future = future
        self._parts = parts
        self._timeout = timeout
        self._deadline = None if timeout is None else monotonic() + timeout
        self._closed = False

    @property
    def call_id(self) -> str:
        """The call's id (its ``correlation_id``)."""
        return self._correlation_id

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Any:
        __tracebackhide__ = True
        parts, future = self._parts, self._future
        while not self._closed:
            if parts.items:
                return parts.items.popleft()
            if future.done():
                self._closed = True
                try:
                    future.result()
                except RemoteError as exc:  # where its reply was read is no news
                    raise exc.with_traceback(None) from None
                break
            try:
                _wait(
                    self._client,
                    lambda: bool(parts.items) or future.done(),
                    future,
                    parts,
                    self._deadline,
                    self._timeout,
                )
            except BaseException:
                self.close()
                raise
        raise StopIteration

    def close(self) -> None:
        """End the call here, if it is still running, and have its server stop
        producing (see :doc:`/cancellation`); the items not taken yet are dropped.
        Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        self._parts.items.clear()
        if not self._future.done():
            self._client.abandon(self._queue, self._correlation_id)

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit, or a broken client: nothing to end
            pass

    def __repr__(self) -> str:
        return f"<Stream {self._parts.method!r} on {self._queue!r}>"


def _result(
    client: Client, future: Future[Any], wait: float | None, timeout: float | None, method: str
) -> Any:
    """Wait for a call to end, reading replies in this thread, and return its result:
    ``wait`` seconds, until the deadline of a call of ``timeout`` seconds.

    The client fails the call at its deadline; waiting a little longer for that is a
    guard against a hang.

    Raises:
        RemoteError: The remote function raised (without the frames that read its reply).
        RPCTimeout: The call timed out, or the guard fired.
        Exception: What else ended the call (``ConnectionLostError``, ...).
    """
    __tracebackhide__ = True
    client.wait(future, wait)
    if not future.done():
        try:
            future.exception(_GUARD)
        except FuturesTimeout:
            assert timeout is not None
            logger.error("call to %r outlived its deadline by %ss; failing it", method, _GUARD)
            raise RPCTimeout(method, timeout) from None
    try:
        return future.result()
    except RemoteError as exc:  # the frames that read its reply are no news to the caller
        raise exc.with_traceback(None) from None


def _wait(
    client: Client,
    ready: Callable[[], bool],
    future: Future[Any],
    parts: CallParts,
    deadline: float | None,
    timeout: float | None,
) -> None:
    """Read replies until ``ready()`` or the call ended. The client's deadline thread
    fails the call at its deadline or idle timeout; if it is more than ``_GUARD``
    seconds late, the call fails here.

    Raises:
        RPCTimeout: The guard fired (:class:`IdleTimeout` for the idle timeout).
    """
    while not (ready() or future.done()):
        idle = parts.idle_due()
        due = deadline if idle is None or (deadline is not None and deadline <= idle) else idle
        now = monotonic()
        if due is not None and now > due + _GUARD:
            logger.error("call to %r outlived its deadline by %ss; failing it", parts.method, _GUARD)
            if due is deadline:
                assert timeout is not None
                raise RPCTimeout(parts.method, timeout)
            assert parts.idle_timeout is not None
            raise IdleTimeout(parts.method, parts.idle_timeout)
        client.wait_for(lambda: ready() or future.done(), None if due is None else max(0.001, due - now))


def _not_as_declared(interface: Callable[..., Any], queue: str, found: list[str]) -> str:
    name = getattr(interface, "__name__", repr(interface))
    return f"the server on {queue!r} does not serve {name} as declared: " + "; ".join(found)
