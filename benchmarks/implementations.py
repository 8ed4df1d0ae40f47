"""What every benchmarked implementation provides, and kombu_rpc's own.

An :class:`Implementation` can serve a :class:`~benchmarks.workload.Workload` on a
queue (in a thread of the process it runs in) and make clients of that queue;
:mod:`benchmarks.sessions` puts the two together for one measurement, with the server
in this process or in one of its own. Baselines live in :mod:`benchmarks.baselines`.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from time import perf_counter
from typing import Any, Protocol

import kombu_rpc
from kombu_rpc import Registry, RPCProxy, RPCServer

from .brokers import Broker
from .workload import Workload


def source_digest() -> str:
    """A short SHA-256 of kombu_rpc's source files, naming the code a run measured."""
    digest = hashlib.sha256()
    package = Path(kombu_rpc.__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


class Client(Protocol):
    """The calls a scenario makes, whatever implements them."""

    def call(self, method: str, *args: Any) -> Any:
        """Call ``method`` and wait for its result."""

    def cast(self, method: str, *args: Any) -> None:
        """Send a call that wants no reply."""

    def pipeline(
        self, method: str, args: tuple[Any, ...], n: int, k: int, deadline: float, latencies: list[float]
    ) -> int:
        """Make up to ``n`` calls keeping ``k`` in flight, appending each call's latency in
        seconds to ``latencies``. Sends no new call after ``deadline`` (a ``perf_counter``
        time) once one was sent; returns how many calls were made, all finished."""

    def close(self) -> None:
        """Release what the client holds (a no-op for a shared client)."""


@dataclass
class Session:
    """A running server with its clients, for one measurement."""

    #: The client a single-threaded scenario drives.
    client: Client
    #: Returns a client for one more worker thread: the shared one for kombu_rpc (its
    #: proxy is thread-safe), a new one with its own connection for the baselines.
    open_client: Callable[[], Client]
    #: The process the server runs in, when it is not this one.
    server_pid: int | None = None


class Implementation(ABC):
    """Something that can serve the workload and call it over ``broker``.

    Args:
        broker: The broker to run on.
        call_timeout: Seconds any single call may wait for its reply.
    """

    #: The name in tables and JSON lines.
    name: str = ""
    #: True for kombu_rpc itself: its results get ratios against the baselines.
    is_kombu_rpc: bool = False
    #: A remark printed under the results table.
    note: str = ""
    #: Longest measured window for this implementation, if shorter than the run's.
    window_cap: float | None = None
    #: The scenario families it is measured in (``None``: every one).
    families: frozenset[str] | None = None

    def __init__(self, broker: Broker, call_timeout: float) -> None:
        self.broker = broker
        self.call_timeout = call_timeout

    @abstractmethod
    def server(self, workload: Workload, queue: str, concurrency: int) -> AbstractContextManager[None]:
        """Serve ``workload`` on ``queue`` in this process, ``concurrency`` calls at a
        time: the context is entered once the server consumes, and stops it on exit."""

    @abstractmethod
    def client(self, queue: str) -> Client:
        """A client of ``queue`` (the caller closes it)."""

    def clients(self, first: Client, queue: str) -> Callable[[], Client]:
        """What gives each further worker thread its client: a new one by default."""
        return lambda: self.client(queue)

    def instrumented(self) -> AbstractContextManager[None]:
        """What a process serving or calling with this implementation turns on first
        (nothing, but for kombu_rpc with metrics)."""
        return nullcontext()


class KombuRPC(Implementation):
    """kombu_rpc: an :class:`~kombu_rpc.RPCServer` and one :class:`~kombu_rpc.RPCProxy`
    shared by every thread, with or without publisher confirms."""

    is_kombu_rpc = True

    def __init__(
        self,
        broker: Broker,
        call_timeout: float,
        confirm_publish: bool = True,
        metrics: bool = False,
        prefetch_multiplier: int = 1,
        call_async: bool = False,
    ) -> None:
        super().__init__(broker, call_timeout)
        self.confirm_publish = confirm_publish
        self.metrics = metrics
        self.prefetch_multiplier = prefetch_multiplier
        self.call_async = call_async
        self.name = "kombu_rpc" if confirm_publish else "kombu_rpc_noconfirm"
        if broker.name == "memory":
            self.note = "kombu_rpc uses its own event-driven memory:// transport (no polling)"
        elif not confirm_publish:
            self.note = "kombu_rpc_noconfirm: proxy and server with confirm_publish=False"
        if prefetch_multiplier != 1:
            self.name = f"kombu_rpc_prefetch{prefetch_multiplier}"
            self.note = (
                f"{self.name}: kombu_rpc whose server takes concurrency x {prefetch_multiplier} "
                "requests ahead (prefetch_multiplier; the default of 1 keeps dispatch fair)"
            )
        if call_async:
            self.name = "kombu_rpc_call_async"
            self.note = (
                "kombu_rpc_call_async: calls in flight made with call_async, completed by the "
                "link's thread (kombu_rpc's other columns pipeline with map, read by the caller)"
            )
        if metrics:
            self.name = "kombu_rpc_metrics"
            self.note = (
                "kombu_rpc_metrics: kombu_rpc with kombu_rpc.metrics on (Prometheus), proxy and server"
            )

    def proxy(self, queue: str) -> RPCProxy:
        """A proxy for ``queue`` with this implementation's settings."""
        return RPCProxy(
            self.broker.url, queue=queue, timeout=self.call_timeout, confirm_publish=self.confirm_publish
        )

    @contextmanager
    def server(self, workload: Workload, queue: str, concurrency: int) -> Iterator[None]:
        """An :class:`~kombu_rpc.RPCServer` consuming in a thread (``running()``)."""
        registry = Registry()
        for name, func in workload.handlers().items():
            registry.remote(name=name)(func)
        server = RPCServer(
            self.broker.url,
            registry=registry,
            queue=queue,
            concurrency=concurrency,
            confirm_publish=self.confirm_publish,
            prefetch_multiplier=self.prefetch_multiplier,
        )
        with server.running():
            yield

    def client(self, queue: str) -> Client:
        """A client owning a new proxy."""
        return KombuRPCClient(self.proxy(queue), self.call_timeout, owner=True, call_async=self.call_async)

    def clients(self, first: Client, queue: str) -> Callable[[], Client]:
        """Every thread shares the first client's proxy."""
        assert isinstance(first, KombuRPCClient)
        return lambda: KombuRPCClient(first.proxy, self.call_timeout, call_async=self.call_async)

    @contextmanager
    def instrumented(self) -> Iterator[None]:
        """kombu_rpc_metrics: Prometheus metrics on, in a registry of their own."""
        if not self.metrics:
            yield
            return
        from prometheus_client import CollectorRegistry

        from kombu_rpc import metrics

        metrics.enable(CollectorRegistry())
        try:
            yield
        finally:
            metrics.disable()


class KombuRPCClient:
    """:class:`Client` over one :class:`~kombu_rpc.RPCProxy`, owned (closed with the
    client) or shared; ``call_async``: pipeline with ``call_async`` rather than ``map``."""

    def __init__(
        self, proxy: RPCProxy, call_timeout: float, owner: bool = False, call_async: bool = False
    ) -> None:
        self.proxy = proxy
        self.call_timeout = call_timeout
        self.owner = owner
        self.call_async = call_async

    def call(self, method: str, *args: Any) -> Any:
        """A blocking call, as ``proxy.fib(0)`` makes it."""
        return self.proxy[method](*args)

    def cast(self, method: str, *args: Any) -> None:
        """``proxy.method.cast(...)``."""
        self.proxy[method].cast(*args)

    def pipeline(
        self, method: str, args: tuple[Any, ...], n: int, k: int, deadline: float, latencies: list[float]
    ) -> int:
        """``proxy.method.map(...)`` with a window of ``k``: the calling thread publishes
        and reads (each latency counted when its result is yielded, in order)."""
        if self.call_async:
            return self._pipeline_async(method, args, n, k, deadline, latencies)
        if not args:
            raise ValueError("map takes each argument from an iterable: a call without any has none")
        started: deque[float] = deque()

        def first_arguments() -> Iterator[Any]:  # taken by map as it sends each call
            for i in range(n):
                if i and perf_counter() >= deadline:
                    return
                started.append(perf_counter())
                yield args[0]

        columns = [first_arguments(), *(repeat(arg) for arg in args[1:])]
        sent = 0
        for _ in self.proxy[method].map(*columns, window=k):
            latencies.append(perf_counter() - started.popleft())
            sent += 1
        return sent

    def _pipeline_async(
        self, method: str, args: tuple[Any, ...], n: int, k: int, deadline: float, latencies: list[float]
    ) -> int:
        """``call_async`` with a semaphore of ``k`` slots, freed by each future's callback.

        Futures are not kept once done (only the first failure is), so that a long run
        holds no memory of its own that the RSS scenario would blame on the proxy.
        """
        slots = threading.Semaphore(k)
        remote = self.proxy[method]
        failures: list[BaseException] = []

        def finished(started: float) -> Callable[[Future[Any]], None]:
            def done(future: Future[Any]) -> None:
                latencies.append(perf_counter() - started)
                error = future.exception()
                if error is not None and not failures:
                    failures.append(error)
                slots.release()

            return done

        sent = 0
        while sent < n and (sent == 0 or perf_counter() < deadline):
            if not slots.acquire(timeout=self.call_timeout + 5):
                raise TimeoutError("no call finished within the call timeout")
            started = perf_counter()
            remote.call_async(*args).add_done_callback(finished(started))
            sent += 1
        for _ in range(k):  # every slot back: every callback has run
            if not slots.acquire(timeout=self.call_timeout + 5):
                raise TimeoutError("calls still in flight after the call timeout")
        if failures:
            raise failures[0]
        return sent

    def close(self) -> None:
        """Close the proxy if this client owns it (not when it shares another's)."""
        if self.owner:
            self.proxy.close()
