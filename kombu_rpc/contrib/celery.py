"""Serve and call remote functions from a Celery project.

:func:`install` adds :class:`RPCServerStep` to the app's workers, so that
``celery -A proj worker`` also runs an :class:`~kombu_rpc.server.RPCServer` for as long
as the worker runs, over the connection settings of the Celery app itself: broker URL,
``broker_transport_options``, ``broker_use_ssl``, ``broker_connection_timeout`` and
``broker_login_method``. :func:`proxy_from_celery` returns an
:class:`~kombu_rpc.proxy.RPCProxy` over the same settings, for the code that calls.

Both read their settings from the app's configuration, under the keys listed in
:data:`SERVER_OPTIONS` with the ``kombu_rpc_`` prefix (``kombu_rpc_queue``,
``kombu_rpc_concurrency``, ...).

Celery is an optional dependency (``pip install 'celery>=5.3'``, or
``pip install -e '.[celery]'`` in a kombu_rpc checkout): importing this module without
it raises :exc:`ImportError`; the rest of kombu_rpc does not need it.

Example:
    In the module that creates the Celery app (``proj.py``)::

        from celery import Celery
        from kombu_rpc import remote
        from kombu_rpc.contrib.celery import install

        app = Celery("proj", broker="amqp://guest:guest@localhost//")
        install(app, queue="proj.rpc")

        @remote
        def fib(n: int) -> int: ...

    ``celery -A proj worker`` then serves ``fib``, and any process calls it with::

        from kombu_rpc.contrib.celery import proxy_from_celery
        from proj import app

        with proxy_from_celery(app) as proxy:
            proxy.fib(30)
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

try:
    from celery import bootsteps
    from celery.bin.base import CeleryOption
    from celery.worker import state as worker_state
except ImportError as exc:  # pragma: no cover - tested in a subprocess that hides celery
    raise ImportError(
        "kombu_rpc.contrib.celery needs Celery, an optional dependency of kombu_rpc: "
        "pip install 'celery>=5.3' (or pip install -e '.[celery]' in a kombu_rpc checkout)",
        name=exc.name,
    ) from exc

from kombu.utils.imports import symbol_by_name

from ..errors import ConfigurationError, ConnectionLostError
from ..options import ServerOptions
from ..proxy import RPCProxy
from ..registry import Registry
from ..server import RPCServer
from ..topology import DEFAULT_QUEUE

__all__ = [
    "install",
    "proxy_from_celery",
    "RPCServerStep",
    "server_options",
    "CONFIG_PREFIX",
    "SERVER_OPTIONS",
    "ENABLED_KEY",
]

logger = logging.getLogger(__name__)

#: Prefix of the Celery configuration keys this module reads: ``kombu_rpc_queue`` and so
#: on (``CELERY_KOMBU_RPC_QUEUE`` with ``config_from_object(..., namespace="CELERY")``).
CONFIG_PREFIX = "kombu_rpc_"

#: The keyword arguments of :class:`~kombu_rpc.server.RPCServer` the worker's server
#: takes from the Celery configuration, each under the key ``kombu_rpc_<name>``: the
#: fields of :class:`~kombu_rpc.options.ServerOptions` (all but ``broker``). Unset
#: keys keep the server's defaults; ``kombu_rpc_registry`` may also be the import path
#: of a :class:`~kombu_rpc.registry.Registry` (``"proj.rpc:registry"``).
SERVER_OPTIONS: tuple[str, ...] = tuple(option.name for option in dataclasses.fields(ServerOptions))

#: Configuration key that turns the worker's server off when false (default: on).
ENABLED_KEY = f"{CONFIG_PREFIX}enabled"

# The keyword arguments a worker gets from the command-line options install() adds.
_CLI_KEYS = ("rpc_queue", "rpc_concurrency", "without_rpc")
# Signals the worker handles in its main thread (shutdown, restart, debugging, children).
_WORKER_SIGNALS = ("SIGINT", "SIGTERM", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGCHLD")


def install(app: Any, *, cli_options: bool = True, **options: Any) -> None:
    """Make the workers of a Celery app serve remote functions.

    Adds :class:`RPCServerStep` to the app's worker bootsteps, so that
    ``celery -A proj worker`` runs an :class:`~kombu_rpc.server.RPCServer` next to its
    task consumer. Call it where the app is created, before the worker starts.

    Keyword arguments set the Celery configuration keys of the same name with the
    ``kombu_rpc_`` prefix: ``install(app, queue="proj.rpc")`` is
    ``app.conf.kombu_rpc_queue = "proj.rpc"`` (and, as for any ``app.conf`` change,
    takes precedence over ``config_from_object``). Calling it again updates them.

    Args:
        app: The ``celery.Celery`` app.
        cli_options: Also add the worker options ``--rpc-queue``, ``--rpc-concurrency``
            and ``--without-rpc``, which override the configuration for one worker.
        **options: Server settings, named as in :data:`SERVER_OPTIONS`.

    Raises:
        ConfigurationError: An option is not one of :data:`SERVER_OPTIONS`.
    """
    unknown = sorted(set(options) - set(SERVER_OPTIONS))
    if unknown:
        raise ConfigurationError(
            f"unknown kombu_rpc server options {unknown}; allowed: {list(SERVER_OPTIONS)}"
        )
    if options:
        app.conf.update({CONFIG_PREFIX + name: value for name, value in options.items()})
    app.steps["worker"].add(RPCServerStep)
    if cli_options:
        present = {option.name for option in app.user_options["worker"]}
        app.user_options["worker"].update(option for option in _cli_options() if option.name not in present)


def proxy_from_celery(app: Any, queue: str | None = None, **kwargs: Any) -> RPCProxy:
    """Return an :class:`~kombu_rpc.proxy.RPCProxy` over a Celery app's broker settings.

    The proxy reaches the broker exactly as the app publishes tasks: its connections are
    built by ``app.connection_for_write()``, as those of the app's connection pool
    (``app.pool``) are, with the broker (write) URL, ``broker_transport_options``,
    ``broker_use_ssl``, ``broker_connection_timeout``, ``broker_login_method`` and
    ``broker_failover_strategy``. It does not borrow connections from the pool: a proxy
    keeps two long-lived connections of its own (one publishes requests, one consumes
    its reply queue), which would hold two of the pool's ``broker_pool_limit``
    connections for the proxy's lifetime; :class:`~kombu_rpc.proxy.RPCProxy` clones the
    connection it is given, and this one is never connected. The proxy connects on
    first use and must be closed (:meth:`~kombu_rpc.proxy.RPCProxy.close`, or use it as
    a context manager).

    Args:
        app: The ``celery.Celery`` app.
        queue: The request queue; by default the app's ``kombu_rpc_queue`` setting
            (the queue its workers serve), else ``"rpc_queue"``.
        **kwargs: Further arguments of :class:`~kombu_rpc.proxy.RPCProxy`
            (``timeout``, ``serializer``, ``retry_policy``, ``confirm_publish``,
            ``secret``). ``secret`` defaults to the app's ``kombu_rpc_secret`` setting.

    Raises:
        ConfigurationError: An argument or setting is invalid.
    """
    conf = app.conf
    if queue is None:
        queue = conf.get(CONFIG_PREFIX + "queue") or DEFAULT_QUEUE
    secret = conf.get(CONFIG_PREFIX + "secret")
    if secret is not None:
        kwargs.setdefault("secret", secret)
    return RPCProxy(app.connection_for_write(), queue=queue, **kwargs)


class RPCServerStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep (a ``celery.bootsteps.StartStopStep``) that serves remote
    functions for the worker's lifetime.

    It belongs to the worker blueprint (``app.steps["worker"]``), not to the consumer
    one, so it is not restarted when the worker's task consumer reconnects. It runs in
    the worker's main process: an :class:`~kombu_rpc.server.RPCServer` serves in a
    background thread from just before the task consumer starts until the worker shuts
    down; its calls run in that thread (or in a thread pool, with
    ``kombu_rpc_concurrency`` above 1), never in the worker's task pool.

    The server's connection is ``app.connection_for_write()``; its settings come from
    the Celery configuration (:data:`SERVER_OPTIONS`), overridden by the worker options
    that :func:`install` adds. ``kombu_rpc_enabled = False`` or ``--without-rpc``
    leaves the step out.

    Starting waits until the server consumes its queue. If the broker cannot be
    reached, it retries as the worker's own consumer does: with
    ``broker_connection_retry_on_startup`` (or ``broker_connection_retry``) on, up to
    ``broker_connection_max_retries`` times (``None`` or 0: forever), until the worker
    is told to shut down; otherwise the worker stops with the error. A warm shutdown
    stops the server and waits for calls in flight (up to
    :attr:`~kombu_rpc.server.RPCServer.shutdown_timeout`); a cold one does not wait.

    Add it with :func:`install`, or directly: ``app.steps["worker"].add(RPCServerStep)``.
    """

    #: Name shown in the worker's bootstep logs and graphs.
    label = "kombu_rpc"
    #: Start after the task pool (so that prefork children are forked before the
    #: server's thread and sockets exist), and thus before the task consumer.
    requires = ("celery.worker.components:Pool",)
    #: Seconds between the first two connection attempts at startup; each further
    #: wait is this much longer, up to :attr:`retry_interval_max`.
    retry_interval: float = 2.0
    #: Longest wait between connection attempts at startup, in seconds.
    retry_interval_max: float = 30.0

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        #: The server, once the step is created (``None`` if the step is left out).
        self.server: RPCServer | None = None
        self._cli = {key: kwargs.get(key) for key in _CLI_KEYS}
        self._running = ExitStack()

    def include_if(self, parent: Any) -> bool:
        """Whether the worker runs the server: not with ``--without-rpc`` or a false
        ``kombu_rpc_enabled``."""
        return not self._cli["without_rpc"] and bool(parent.app.conf.get(ENABLED_KEY, True))

    def create(self, parent: Any) -> RPCServer:
        """Create the server (not started yet) from the app's settings.

        Raises:
            ConfigurationError: A setting is invalid (the worker does not start).
        """
        options = server_options(parent.app.conf)
        if self._cli["rpc_queue"] is not None:
            options["queue"] = self._cli["rpc_queue"]
        if self._cli["rpc_concurrency"] is not None:
            options["concurrency"] = self._cli["rpc_concurrency"]
        self.server = RPCServer(parent.app.connection_for_write(), **options)
        return self.server

    def start(self, parent: Any) -> None:
        """Start the server in a background thread; return once it consumes.

        Raises:
            ConnectionLostError: The broker could not be reached, and connection
                retries at startup are off or used up.
        """
        server = self._server()
        conf = parent.app.conf
        retry_setting = conf.get("broker_connection_retry_on_startup")
        if retry_setting is None:
            retry_setting = conf.get("broker_connection_retry", True)
        max_retries = conf.get("broker_connection_max_retries")
        retries = 0
        while True:
            try:
                with _worker_signals_blocked():  # the server's threads inherit the mask
                    self._running.enter_context(server.running())
                break
            except ConnectionLostError as exc:
                if not retry_setting or (max_retries and retries >= max_retries):
                    logger.error("kombu_rpc server on %r cannot start: %s", server.queue, exc)
                    raise
                retries += 1
                interval = min(self.retry_interval * retries, self.retry_interval_max)
                logger.error(
                    "kombu_rpc server on %r cannot connect: %s; trying again in %gs (%d/%s)",
                    server.queue,
                    exc,
                    interval,
                    retries,
                    max_retries or "forever",
                )
                _sleep_unless_shutdown(interval)
        names = server.registry.names()
        logger.info(
            "kombu_rpc server %s serving %d function(s) on %r (concurrency %d): %s",
            server.server_id,
            len(names),
            server.queue,
            server.concurrency,
            ", ".join(names) or "(none)",
        )

    def close(self, parent: Any) -> None:
        """Ask the server to stop (without waiting), as the worker starts shutting down."""
        if self.server is not None:
            self.server.stop()

    def stop(self, parent: Any) -> None:
        """Stop the server and wait for it, with its calls in flight (warm shutdown)."""
        self._stop()

    def terminate(self, parent: Any) -> None:
        """Stop the server without waiting for calls in flight (cold shutdown); their
        requests are not acknowledged, so the broker delivers them again."""
        if self.server is not None:
            self.server.shutdown_timeout = 0.0
        self._stop()

    def info(self, parent: Any) -> dict[str, Any]:
        """The server's queue, id and state, for ``celery inspect stats``."""
        server = self.server
        if server is None:
            return {}
        return {"kombu_rpc": {"queue": server.queue, "server_id": server.server_id, "ready": server.ready}}

    def _server(self) -> RPCServer:
        if self.server is None:
            raise ConfigurationError("RPCServerStep.start() called before create()")
        return self.server

    def _stop(self) -> None:
        server = self.server
        if server is None:
            return
        try:
            self._running.close()
        except Exception:
            logger.exception("kombu_rpc server on %r failed", server.queue)
        else:
            logger.info("kombu_rpc server %s on %r stopped", server.server_id, server.queue)


# Celery's step metaclass sets __qualname__ to the dotted path, which hides the class's
# attribute docstrings from Sphinx; the step's name (its key in the blueprint) is unchanged.
RPCServerStep.__qualname__ = RPCServerStep.__name__


def server_options(conf: Any) -> dict[str, Any]:
    """The :class:`~kombu_rpc.server.RPCServer` keyword arguments set in a Celery
    configuration (``app.conf``): those of :data:`SERVER_OPTIONS` whose
    ``kombu_rpc_`` key is set, with ``kombu_rpc_registry`` imported if it is a path.

    Raises:
        ConfigurationError: ``kombu_rpc_registry`` cannot be imported.
    """
    options: dict[str, Any] = {}
    for name in SERVER_OPTIONS:
        value = conf.get(CONFIG_PREFIX + name)
        if value is not None:
            options[name] = value
    registry = options.get("registry")
    if isinstance(registry, str):
        try:
            registry = symbol_by_name(registry)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigurationError(f"cannot import {CONFIG_PREFIX}registry {registry!r}: {exc}") from exc
        if not isinstance(registry, Registry):
            raise ConfigurationError(
                f"{CONFIG_PREFIX}registry {options['registry']!r} is not a kombu_rpc.Registry: {registry!r}"
            )
        options["registry"] = registry
    return options


def _cli_options() -> list[Any]:
    group = "kombu_rpc Options"
    return [
        CeleryOption(
            ["--rpc-queue"],
            help="Request queue of the kombu_rpc server (overrides kombu_rpc_queue).",
            help_group=group,
        ),
        CeleryOption(
            ["--rpc-concurrency"],
            type=int,
            help="Remote calls the kombu_rpc server runs at once (overrides kombu_rpc_concurrency).",
            help_group=group,
        ),
        CeleryOption(
            ["--without-rpc"],
            is_flag=True,
            default=False,
            help="Do not run the kombu_rpc server in this worker.",
            help_group=group,
        ),
    ]


@contextmanager
def _worker_signals_blocked() -> Iterator[None]:
    """Block the worker's signals in this thread, so threads started meanwhile never
    receive them.

    A process-directed signal goes to any thread that does not block it. Python runs
    the handler in the main thread anyway, but only once that thread wakes up: when the
    signal lands in another thread, the worker's event loop is not interrupted and
    notices a SIGTERM only when its poll times out.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    signals = {getattr(signal, name) for name in _WORKER_SIGNALS if hasattr(signal, name)}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _sleep_unless_shutdown(seconds: float) -> None:
    """Sleep, but raise Celery's shutdown exception as soon as the worker is told to stop."""
    deadline = time.monotonic() + seconds
    while True:
        worker_state.maybe_shutdown()
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.25))
