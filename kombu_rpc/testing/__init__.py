"""Helpers for testing code that serves or calls remote functions.

They need no test framework: :func:`serving` runs a server in a background thread and
hands back a proxy connected to it, on a request queue of its own. The pytest plugin,
:mod:`kombu_rpc.testing.pytest_plugin`, builds its fixtures on these helpers.

Example:
    >>> from kombu_rpc.testing import serving
    >>> def add(a, b):
    ...     return a + b
    >>> with serving([add]) as (server, proxy):
    ...     proxy.add(2, 3)
    5
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeAlias

from kombu.transport import memory as kombu_memory

from ..connection import Broker, connect
from ..errors import ConfigurationError
from ..proxy import RPCProxy
from ..registry import Registry, default_registry
from ..server import RPCServer
from ..topology import check_queue_name, discard_queue, new_id, request_queue

__all__ = [
    "Functions",
    "Served",
    "serving",
    "running_server",
    "make_registry",
    "copy_registry",
    "unique_queue_name",
    "is_memory_broker",
    "reset_memory_transport",
    "DEFAULT_TIMEOUT",
    "PLUGIN",
    "pytest_plugin_args",
]

logger = logging.getLogger(__name__)

#: What :func:`serving` and :func:`running_server` accept as the functions to serve: a
#: :class:`~kombu_rpc.registry.Registry` (served as is), a mapping of remote names to
#: functions, or an iterable of functions (see :func:`make_registry`).
Functions: TypeAlias = Registry | Mapping[str, Callable[..., Any]] | Iterable[Callable[..., Any]]

#: The module name of the pytest plugin, as given to ``pytest -p``.
PLUGIN = "kombu_rpc.testing.pytest_plugin"

#: Seconds a proxy made by :func:`serving` waits for each reply, unless told otherwise.
DEFAULT_TIMEOUT = 10.0


class Served(NamedTuple):
    """A running server and a proxy that calls it, as yielded by :func:`serving`.

    A named tuple, so it unpacks: ``with serving(...) as (server, proxy):``.
    """

    #: The server, consuming :attr:`queue` in a background thread.
    server: RPCServer
    #: A proxy publishing to the server's request queue.
    proxy: RPCProxy

    @property
    def queue(self) -> str:
        """The request queue the server consumes and the proxy publishes to."""
        return self.server.queue


def make_registry(functions: Functions) -> Registry:
    """Return a :class:`~kombu_rpc.registry.Registry` serving ``functions``.

    Args:
        functions: A ``Registry``, returned unchanged; a mapping of remote names to
            functions; or an iterable of functions. A function from the iterable that is
            registered in :data:`~kombu_rpc.registry.default_registry` (with
            ``@remote``) keeps the name it has there, so ``@remote(name="math.add")``
            is served as ``math.add``; any other function is served under its
            ``__name__``.

    Raises:
        ConfigurationError: ``functions`` is none of the above, or holds something
            that cannot be registered (see :meth:`~kombu_rpc.registry.Registry.register`).
    """
    if isinstance(functions, Registry):
        return functions
    registry = Registry()
    if isinstance(functions, Mapping):
        for name, func in functions.items():
            registry.register(func, name=name)
        return registry
    if isinstance(functions, (str, bytes)) or not isinstance(functions, Iterable):
        raise ConfigurationError(
            "functions must be a Registry, a mapping of names to functions or a list of "
            f"functions, got {functions!r}"
        )
    known = {id(procedure.func): procedure.name for procedure in default_registry}
    for func in functions:
        registry.register(func, name=known.get(id(func)))
    return registry


def copy_registry(registry: Registry | None = None) -> Registry:
    """Return a new registry holding the functions of ``registry`` under the same names.

    Registering in or unregistering from the copy leaves the original alone.

    Args:
        registry: The registry to copy; ``None`` copies
            :data:`~kombu_rpc.registry.default_registry`.
    """
    source = default_registry if registry is None else registry
    copy = Registry()
    for procedure in source:
        copy.register(procedure.func, name=procedure.name)
    return copy


def unique_queue_name(prefix: str = "test") -> str:
    """Return a request queue name no other call returns: ``prefix`` plus a random id.

    Raises:
        ConfigurationError: The result would not be a valid queue name (``prefix``
            holds whitespace, starts with ``amq.`` or is too long).
    """
    return check_queue_name(f"{prefix}.{new_id()}")


def is_memory_broker(broker: Broker) -> bool:
    """Whether ``broker`` (a URL or a :class:`kombu.Connection`) is in-process ``memory://``.

    Raises:
        ConfigurationError: ``broker`` is not a valid broker (see
            :func:`~kombu_rpc.connection.connect`).
    """
    transport = connect(broker).transport_cls
    return isinstance(transport, type) and issubclass(transport, kombu_memory.Transport)


def reset_memory_transport() -> None:
    """Empty the process-wide state of the ``memory://`` broker.

    kombu keeps every memory queue, exchange and binding in class attributes shared by
    all memory connections of the process (kombu_rpc's ``kombu_rpc._transports.memory``
    transport shares them too), so they outlive the connections that made them. This
    drops all of them, with the messages they hold.

    Call it only while no ``memory://`` server or proxy is running: their queues would
    vanish under them.
    """
    from .._transports import memory  # here: importing kombu_rpc.testing loads no transport

    for channel in (kombu_memory.Channel, memory.Channel):
        channel.queues.clear()
        channel.events.clear()
    for transport in (kombu_memory.Transport, memory.Transport):
        transport.global_state.clear()


def _discard_request_queue(broker: Broker, queue: str) -> None:
    """Delete a request queue and the messages left in it; failures are only logged."""
    conn = connect(broker)
    try:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
        discard_queue(request_queue(queue)(conn.default_channel))
    except Exception as exc:  # cleanup must not hide the outcome of the test
        logger.warning("could not delete the request queue %r: %s", queue, exc)
    finally:
        conn.release()


@contextmanager
def running_server(
    functions: Functions, broker: Broker = "memory://", queue: str | None = None, **server_kwargs: Any
) -> Iterator[RPCServer]:
    """Serve ``functions`` in a background thread for the duration of a ``with`` block.

    The block starts once the server consumes its queue. On exit the server stops
    (see :meth:`~kombu_rpc.server.RPCServer.running`) and its request queue is deleted
    with any request left in it, so nothing is left behind on a real broker.

    Args:
        functions: What to serve (see :func:`make_registry`).
        broker: Broker URL or :class:`kombu.Connection`.
        queue: The request queue; ``None`` makes a unique one
            (:func:`unique_queue_name`).
        **server_kwargs: Passed on to :class:`~kombu_rpc.server.RPCServer`, such as
            ``concurrency`` or ``accept``.

    Raises:
        ConfigurationError: Bad functions, queue name or server options.
        ConnectionLostError: The broker could not be reached.
    """
    server = RPCServer(
        broker,
        registry=make_registry(functions),
        queue=unique_queue_name() if queue is None else queue,
        **server_kwargs,
    )
    try:
        with server.running():
            yield server
    finally:
        _discard_request_queue(broker, server.queue)


@contextmanager
def serving(
    functions: Functions,
    broker: Broker = "memory://",
    queue: str | None = None,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    serializer: str = "json",
    **server_kwargs: Any,
) -> Iterator[Served]:
    """Serve ``functions`` in a background thread and yield a proxy that calls them.

    Like :func:`running_server`, plus an :class:`~kombu_rpc.proxy.RPCProxy` on the same
    queue, closed on exit before the server stops.

    Args:
        functions: What to serve (see :func:`make_registry`).
        broker: Broker URL or :class:`kombu.Connection`.
        queue: The request queue; ``None`` makes a unique one.
        timeout: Seconds the proxy waits for each reply (``None``: forever).
        serializer: The proxy's serializer.
        **server_kwargs: Passed on to :class:`~kombu_rpc.server.RPCServer`.

    Yields:
        The server and the proxy, as a :class:`Served` named tuple.

    Raises:
        ConfigurationError: Bad functions, queue name, or server or proxy options.
        ConnectionLostError: The broker could not be reached.
    """
    with running_server(functions, broker, queue, **server_kwargs) as server:
        with RPCProxy(broker, queue=server.queue, timeout=timeout, serializer=serializer) as proxy:
            yield Served(server, proxy)


def pytest_plugin_args() -> list[str]:
    """Return the pytest command-line arguments that load the plugin.

    Installing kombu_rpc declares the plugin as a ``pytest11`` entry point, so pytest
    loads it by itself: this returns ``[]``, because naming it again with ``-p`` would
    register it twice, which pytest refuses. Run from a source checkout that is not
    installed, it returns ``["-p", "kombu_rpc.testing.pytest_plugin"]``. Useful to run
    pytest from code, for example ``pytest.main([path, *pytest_plugin_args()])``.
    """
    entry_points = importlib.metadata.entry_points(group="pytest11")
    if any(entry_point.value.strip() == PLUGIN for entry_point in entry_points):
        return []
    return ["-p", PLUGIN]
