"""AsyncRPCProxy: remote calls awaited from asyncio code (owns no broker code).

kombu is synchronous, so the async proxy drives the same machinery as
:class:`~kombu_rpc.proxy.RPCProxy`: one ``kombu_rpc._client.Client`` with one
reply queue, read by a thread of the client that completes a
:class:`concurrent.futures.Future` per call by correlation id. Each of these
futures is bridged to the event loop with ``asyncio.wrap_future``.

Every step that can block (connecting on the first call, encoding and publishing a
request, closing) runs on one worker thread owned by the proxy and shared by its
:meth:`~AsyncRPCProxy.options` views, in the order the calls were made. The event loop
only hands work to that thread and awaits futures: it never touches a socket, takes
the client's lock or waits for another thread.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar, cast

from ._client import BroadcastReply
from .codecs import Codec
from .connection import Broker
from .errors import CallError, ConfigurationError, RemoteError
from .interfaces import interface_methods, mismatches, typed_view
from .options import ProxyOptions
from .proxy import _UNSET, RPCProxy, Stream, _not_as_declared
from .registry import RESERVED_PREFIX
from .topology import DEFAULT_QUEUE

_T = TypeVar("_T")


class _Sender:
    """The worker thread that runs the blocking steps of one proxy and its views."""

    def __init__(self) -> None:
        # One worker keeps the requests in the order the calls were made. It starts on
        # the first call.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kombu_rpc-aio")
        self._lock = threading.Lock()
        self._closed: Future[None] | None = None

    def run(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> asyncio.Future[_T]:
        """Run ``fn`` on the worker thread; returns a future of the running loop."""
        loop = asyncio.get_running_loop()
        return asyncio.wrap_future(self.submit(fn, *args, **kwargs), loop=loop)

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        """Run ``fn`` on the worker thread; returns its future."""
        with self._lock:
            if self._closed is not None:
                raise CallError("the proxy is closed")
            return self._executor.submit(fn, *args, **kwargs)

    def close(self, fn: Callable[[], None]) -> Future[None]:
        """Run ``fn`` after the work already queued, then stop the worker; idempotent."""
        with self._lock:
            if self._closed is None:
                self._closed = self._executor.submit(fn)
                self._executor.shutdown(wait=False)  # the queued work still runs
            return self._closed


class AsyncRPCProxy:
    """Calls functions served by an :class:`~kombu_rpc.RPCServer` from asyncio code.

    The asyncio counterpart of :class:`~kombu_rpc.proxy.RPCProxy`, with the same
    arguments and errors. Attribute access builds an :class:`AsyncMethodProxy`;
    awaiting a call sends the request and waits for the reply without blocking the
    event loop. The proxy connects on first use and owns one reply queue, shared by all
    the calls in flight. It is not bound to an event loop: it can be created outside
    one, and used from several event loops.

    Args:
        broker: Broker URL or :class:`kombu.Connection` (cloned, not used directly);
            ``None``: the URL in the ``KOMBU_RPC_BROKER_URL`` environment variable.
        queue: The request queue the server consumes.
        timeout: Seconds to wait for each reply (``None``: wait forever), counted from
            the moment the request is published.
        serializer: Serializer for requests; replies come back in the same one.
        retry_policy: Overrides for connecting and publishing retries (keys of
            :data:`kombu_rpc.connection.DEFAULT_RETRY_POLICY`).
        confirm_publish: As for :class:`~kombu_rpc.proxy.RPCProxy`: on AMQP, publisher
            confirms and ``mandatory`` requests (``NoServerError`` at once).
        secret: As for :class:`~kombu_rpc.proxy.RPCProxy`: sign every request.
        codec: As for :class:`~kombu_rpc.proxy.RPCProxy`: the wire format.
        direct_reply_to: As for :class:`~kombu_rpc.proxy.RPCProxy`: RabbitMQ's direct
            reply-to instead of a reply queue.
        retry: As for :class:`~kombu_rpc.proxy.RPCProxy`: the calls are safe to run
            twice, so a call whose reply was lost with a connection is sent again.
        idle_timeout: As for :class:`~kombu_rpc.proxy.RPCProxy`: fail a call after this
            many seconds without any message about it.

    Raises:
        ConfigurationError: An argument is invalid (nothing is connected yet).

    Example:
        >>> async with AsyncRPCProxy("memory://", queue="rpc_queue") as proxy:  # doctest: +SKIP
        ...     await proxy.fib(30)
        832040

    Note:
        Remote names that clash with the proxy's own attributes (``options``,
        ``aclose``, ``queue``, ``timeout``, ``reply_queue``) or with the methods of a
        remote function (``call_async``, ``cast``, ``broadcast``, ``stream``) are
        reached by item access: ``await proxy["options"]()``.
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
        self._bind(RPCProxy._from_options(broker, options), _Sender(), owner=True)

    def _bind(self, sync: RPCProxy, sender: _Sender, owner: bool) -> None:
        self._sync = sync  # the blocking proxy (or view) whose calls this one awaits
        self._sender = sender
        self._owner = owner  # closing closes the proxy (not a view's)

    def options(
        self,
        *,
        timeout: float | None = _UNSET,
        retry: bool = _UNSET,
        idle_timeout: float | None = _UNSET,
        on_progress: Callable[[Any], None] | None = _UNSET,
    ) -> AsyncRPCProxy:
        """Return a view of this proxy with per-call options overridden.

        The view shares the reply queue, the connections and the worker thread; it is
        closed with this proxy.

        Args:
            timeout: Seconds to wait for each reply (``None``: wait forever). Omit to
                keep this proxy's timeout.
            retry: Whether the calls are safe to run twice. Omit to keep this proxy's.
            idle_timeout: Seconds without any message about a call after which it
                fails with :class:`~kombu_rpc.errors.IdleTimeout`. Omit to keep this
                proxy's.
            on_progress: As for :meth:`RPCProxy.options
                <kombu_rpc.proxy.RPCProxy.options>`: called with each progress value,
                in the thread that reads the replies (not in the event loop).

        Raises:
            ConfigurationError: ``timeout`` or ``idle_timeout`` is not a positive
                number or ``None``, ``retry`` not a bool, or ``on_progress`` not
                callable.
        """
        view = type(self).__new__(type(self))
        sync = self._sync.options(
            timeout=timeout, retry=retry, idle_timeout=idle_timeout, on_progress=on_progress
        )
        view._bind(sync, self._sender, owner=False)
        return view

    def typed(self, interface: Callable[..., _T], *, prefix: str = "") -> _T:
        """Return a view of this proxy that type checkers see as ``interface``,
        whose methods are declared ``async def``: ``await proxy.typed(Math).add(1, 2)``
        is checked against ``Math.add``. As :meth:`RPCProxy.typed
        <kombu_rpc.proxy.RPCProxy.typed>` otherwise.

        Raises:
            ConfigurationError: ``interface`` is not a class, declares no method, or
                declares one with plain ``def``, or ``prefix`` is not a dotted name.
        """
        return cast(_T, typed_view(interface, prefix, True, self.__getitem__))

    async def check_interface(self, interface: Callable[..., Any], *, prefix: str = "") -> None:
        """As :meth:`RPCProxy.check_interface <kombu_rpc.proxy.RPCProxy.check_interface>`,
        for an interface of ``async def`` methods."""
        methods = interface_methods(interface, prefix, asynchronous=True)
        found = mismatches(methods, await self[f"{RESERVED_PREFIX}describe"]())
        if found:
            raise ConfigurationError(_not_as_declared(interface, self.queue, found))

    @property
    def queue(self) -> str:
        """The request queue this proxy publishes to."""
        return self._sync.queue

    @property
    def timeout(self) -> float | None:
        """Seconds each call waits for its reply, or None to wait forever."""
        return self._sync.timeout

    @property
    def reply_queue(self) -> str:
        """The name of this proxy's reply queue."""
        return self._sync.reply_queue

    async def aclose(self) -> None:
        """Delete the reply queue and close the connections, off the event loop.

        Requests of calls made before ``aclose`` are still sent; calls still waiting
        for their reply then fail with :class:`~kombu_rpc.errors.CallError`, and so
        does every later call. Closing twice is harmless, and cancelling ``aclose``
        does not stop the closing. A view from :meth:`options` is closed with the
        proxy that made it; closing the view does nothing.
        """
        if self._owner:
            closed = self._sender.close(self._sync.close)
            await asyncio.shield(asyncio.wrap_future(closed))

    async def __aenter__(self) -> AsyncRPCProxy:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __getattr__(self, name: str) -> AsyncMethodProxy:
        if name.startswith("_"):
            raise AttributeError(name)
        return AsyncMethodProxy(self, name)

    def __getitem__(self, name: str) -> AsyncMethodProxy:
        return AsyncMethodProxy(self, name)

    def __repr__(self) -> str:
        return f"<AsyncRPCProxy queue={self.queue!r} timeout={self.timeout}>"


class AsyncMethodProxy:
    """One remote function, reached as ``proxy.name`` or ``proxy["dotted.name"]``.

    ``await proxy.fib(30)`` sends the request and returns the result, or raises what
    the blocking call raises: :class:`~kombu_rpc.errors.RemoteError` (or a subclass
    such as :class:`~kombu_rpc.errors.MethodNotFound`),
    :class:`~kombu_rpc.errors.RPCTimeout`, :class:`~kombu_rpc.errors.CallError` when
    the proxy is closed, and the errors of sending listed under :meth:`call_async`.
    Cancelling the call cancels it on its server (see :doc:`/cancellation`); the request
    is not sent if it was still queued behind others, and a reply that arrives later is
    dropped.

    :meth:`call_async` returns a future once the request is sent, :meth:`cast`
    sends without waiting for a reply and :meth:`stream` iterates over a remote
    generator's items (``async for``). Attribute access extends a dotted name:
    ``proxy.math.add`` is ``proxy["math.add"]``.
    """

    def __init__(self, proxy: AsyncRPCProxy, name: str) -> None:
        self._proxy = proxy
        self._name = name

    def __getattr__(self, name: str) -> AsyncMethodProxy:
        if name.startswith("_"):
            raise AttributeError(name)
        return AsyncMethodProxy(self._proxy, f"{self._name}.{name}")

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the remote function and return its result.

        Cancelling the call (its task) cancels it: the request is not sent if it
        was still queued behind others, and otherwise the server running it is told
        to cancel it (see :doc:`/cancellation`); a reply that arrives later is dropped.

        Raises:
            RemoteError: The remote function raised (or the call was refused).
            RPCTimeout: No reply within the proxy's timeout.
            CallError: The proxy is closed, or was closed before the reply arrived.
            ConnectionLostError: The broker could not be reached.
            SerializationError: The arguments cannot be encoded.
            ConfigurationError: The name is not a valid remote name.
        """
        future = await self.call_async(*args, **kwargs)
        return await future

    async def call_async(self, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Send the call and return an ``asyncio.Future`` of its result.

        Returns once the request is queued for publishing, so the errors found before
        sending are raised here, as by a call; a failed publish (such as
        :class:`~kombu_rpc.errors.NoServerError`) fails the future. Await the future for
        the result; it fails with :class:`~kombu_rpc.RPCTimeout` at the deadline even
        if nobody awaits it. Cancelling it (or the task awaiting it) cancels the call
        on its server (see :doc:`/cancellation`); cancelling ``call_async`` itself while
        the request is being sent cancels the call once sent.

        Returns:
            An ``asyncio.Future`` of the remote function's result, bound to the running
            event loop.

        Raises:
            CallError: The proxy is closed.
            ConnectionLostError: The broker could not be reached.
            SerializationError: The arguments cannot be encoded.
            ConfigurationError: The name is not a valid remote name.
        """
        proxy = self._proxy
        method = proxy._sync[self._name]
        sending = proxy._sender.submit(method.call_async, *args, **kwargs)
        try:
            sent = await asyncio.wrap_future(sending)
        except asyncio.CancelledError:  # a request being sent goes out: cancel its call
            sending.add_done_callback(_cancel_sent)
            raise
        return asyncio.wrap_future(sent)

    def stream(self, *args: Any, **kwargs: Any) -> AsyncStream:
        """Call a remote generator function and iterate over its items as the server
        produces them: ``async for item in proxy.count.stream(10): ...``.

        The request is sent when the iteration starts. Otherwise as
        :meth:`RPCProxy.stream <kombu_rpc.proxy.MethodProxy.stream>`; closing the stream
        early (:meth:`AsyncStream.aclose`, leaving its ``async with`` block, or dropping
        it) ends the call here at once. See :doc:`/streaming`.
        """
        return AsyncStream(self._proxy, self._name, args, kwargs)

    async def cast(self, *args: Any, **kwargs: Any) -> None:
        """Send the call without asking for a reply (fire and forget); returns ``None``.

        Returns once the request is published. The server runs it and logs any error.

        Raises:
            CallError: The proxy is closed.
            ConnectionLostError: The broker could not be reached.
            SerializationError: The arguments cannot be encoded.
            ConfigurationError: The name is not a valid remote name.
        """
        proxy = self._proxy
        await proxy._sender.run(proxy._sync[self._name].cast, *args, **kwargs)

    async def broadcast(
        self, *args: Any, timeout: float = 1.0, expect: int | None = None, **kwargs: Any
    ) -> list[BroadcastReply]:
        """Call the function on every server of the queue and return their replies:
        :meth:`kombu_rpc.proxy.MethodProxy.broadcast`, awaited. It waits in the event
        loop's default executor, so the proxy's other calls go on meanwhile."""
        method = self._proxy._sync[self._name]
        call = functools.partial(method.broadcast, *args, timeout=timeout, expect=expect, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(None, call)

    def __repr__(self) -> str:
        return f"<AsyncMethodProxy {self._name!r} on {self._proxy.queue!r}>"


def _cancel_sent(sending: Future[Future[Any]]) -> None:
    """Cancel the call whose sending was done after its caller was cancelled."""
    if not sending.cancelled() and sending.exception() is None:
        sending.result().cancel()


class AsyncStream:
    """The items of a remote generator, as they arrive: an asynchronous iterator
    returned by :meth:`AsyncMethodProxy.stream`, and an asynchronous context manager
    that closes it.

    The request is sent on the first ``__anext__``. The link's thread reads the
    replies; the event loop only awaits them.
    """

    def __init__(
        self, proxy: AsyncRPCProxy, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._proxy = proxy
        self._name = name
        self._args = args
        self._kwargs = kwargs
        self._stream: Stream | None = None
        self._arrived: asyncio.Event | None = None
        self._closed = False

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        stream = self._stream
        if stream is None:
            stream = self._stream = await self._start()
        parts, future, arrived = stream._parts, stream._future, self._arrived
        assert arrived is not None
        while True:
            if parts.items:
                return parts.items.popleft()
            if future.done():
                self._closed = stream._closed = True
                try:
                    future.result()
                except RemoteError as exc:
                    raise exc.with_traceback(None) from None
                raise StopAsyncIteration
            arrived.clear()
            if not (parts.items or future.done()):  # checked again: a wake-up cannot slip by
                try:
                    await arrived.wait()
                except asyncio.CancelledError:  # the task was cancelled: so is the call
                    await self.aclose()
                    raise

    async def _start(self) -> Stream:
        proxy = self._proxy
        method = proxy._sync[self._name]
        loop = asyncio.get_running_loop()
        arrived = self._arrived = asyncio.Event()

        def notify() -> None:
            try:
                loop.call_soon_threadsafe(arrived.set)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        stream: Stream = await proxy._sender.run(method._start_stream, False, self._args, self._kwargs)
        stream._parts.notify = notify
        stream._future.add_done_callback(lambda _: notify())
        return stream

    async def aclose(self) -> None:
        """End the call here, if it is still running; as :meth:`Stream.close
        <kombu_rpc.proxy.Stream.close>`."""
        self._closed = True
        if self._stream is not None:
            self._stream.close()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:  # at interpreter exit, or a broken client
                pass

    def __repr__(self) -> str:
        return f"<AsyncStream {self._name!r} on {self._proxy.queue!r}>"
