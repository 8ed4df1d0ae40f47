"""Broker selection and shared fixtures.

Tests that take ``broker_url`` run once on ``memory://`` and once per real broker in
``KOMBU_RPC_TEST_BROKERS`` (comma-separated; default: the local RabbitMQ and Redis).
An unreachable real broker skips its tests, unless ``KOMBU_RPC_REQUIRE_BROKERS=1``
(as in CI): then each of its tests fails.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from functools import cache
from typing import Any

import pytest
from kombu import Connection, Queue

from kombu_rpc import Registry, RPCProxy, RPCServer
from kombu_rpc.testing import unique_queue_name
from kombu_rpc.topology import broadcast_exchange, cancel_exchange, held_cancels

DEFAULT_BROKERS = "amqp://guest:guest@127.0.0.1:5672//,redis://127.0.0.1:6379/0"
MEMORY = "memory://"


def real_brokers() -> list[str]:
    raw = os.environ.get("KOMBU_RPC_TEST_BROKERS", DEFAULT_BROKERS)
    return [url.strip() for url in raw.split(",") if url.strip()]


def broker_id(url: str) -> str:
    return url.split("://", 1)[0]


#: Fixture name -> which broker URLs it is parametrized over.
BROKER_FIXTURES: dict[str, Callable[[], list[str]]] = {
    "broker_url": lambda: [MEMORY, *real_brokers()],
    "real_broker_url": real_brokers,
    "amqp_url": lambda: [url for url in real_brokers() if url.startswith("amqp")],
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for name, urls in BROKER_FIXTURES.items():
        if name in metafunc.fixturenames:
            chosen = urls()
            if name == "broker_url" and getattr(metafunc.module, "REAL_BROKERS_ONLY", False):
                chosen = real_brokers()
            if name == "broker_url" and getattr(metafunc.module, "AMQP_ONLY", False):
                chosen = BROKER_FIXTURES["amqp_url"]()
            metafunc.parametrize(name, chosen, ids=[broker_id(u) for u in chosen], indirect=True)


@cache
def unreachable_reason(url: str) -> str | None:
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return f"broker {url} is unreachable: {exc!r}"
    return None


def checked_broker(request: pytest.FixtureRequest) -> str:
    url: str = request.param
    if url != MEMORY:
        reason = unreachable_reason(url)
        if reason is not None:
            if os.environ.get("KOMBU_RPC_REQUIRE_BROKERS") == "1":
                pytest.fail(f"{reason} (KOMBU_RPC_REQUIRE_BROKERS=1)")
            pytest.skip(reason)
    return url


broker_url = pytest.fixture(checked_broker, name="broker_url")
real_broker_url = pytest.fixture(checked_broker, name="real_broker_url")
amqp_url = pytest.fixture(checked_broker, name="amqp_url")


@pytest.fixture
def queue_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A request queue name no other test uses; on the real broker the test uses (any
    of :data:`BROKER_FIXTURES`) the queue is deleted after the test (servers never
    delete theirs)."""
    name = unique_queue_name()
    yield name
    for fixture in BROKER_FIXTURES:
        if fixture in request.fixturenames:
            delete_queue(request.getfixturevalue(fixture), name)


class Gate:
    """Lets tests hold remote functions until released, and know when they started."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.entered = threading.Semaphore(0)

    def wait_entered(self, count: int = 1, timeout: float = 10.0) -> None:
        for _ in range(count):
            assert self.entered.acquire(timeout=timeout), "remote function did not start in time"


class Recorder:
    """Records calls; ``wait(n)`` blocks until at least ``n`` were recorded."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self._cond = threading.Condition()

    def add(self, value: Any) -> None:
        with self._cond:
            self.calls.append(value)
            self._cond.notify_all()

    def wait(self, count: int, timeout: float = 10.0) -> list[Any]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.calls) >= count, timeout), self.calls
            return list(self.calls)


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.released.set()  # never leave a server thread blocked


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def registry(gate: Gate, recorder: Recorder) -> Registry:
    """Functions the behaviour tests call."""
    reg = Registry()

    @reg.remote
    def fib(n: int) -> int:
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a

    @reg.remote(name="math.add")
    def add(a: Any, b: Any) -> Any:
        return a + b

    @reg.remote
    def echo(value: Any) -> Any:
        return value

    @reg.remote
    def boom(message: str = "bad n") -> None:
        raise ValueError(message)

    @reg.remote
    def unserializable() -> object:
        return {1, 2, 3}

    @reg.remote
    def record(value: Any) -> None:
        recorder.add(value)

    @reg.remote
    def held(value: Any = None) -> Any:
        gate.entered.release()
        assert gate.released.wait(20), "test never released the gate"
        recorder.add(value)
        return value

    return reg


ServeFactory = Callable[..., AbstractContextManager[RPCServer]]


@pytest.fixture
def servers(
    gate: Gate, broker_url: str, queue_name: str, proxies: Callable[..., RPCProxy]
) -> Iterator[ExitStack]:
    # Set up after the proxies, so torn down before them: the replies of held calls
    # reach proxies still open (a reply to a closed proxy's queue would make it again)
    with ExitStack() as stack:
        yield stack
        gate.released.set()  # let held calls finish so the servers stop at once
    delete_queue(broker_url, queue_name)


def delete_queue(broker_url: str, name: str) -> None:
    """Delete a request queue a test used: servers never delete theirs, and the real
    brokers are shared by every run. On Redis, purging removes the list itself, and
    the binding tables of the queue's broadcast and cancel exchanges go too: a server
    killed in the test left its queues in them (on RabbitMQ that queue went with its
    connection, and the exchange with it)."""
    if broker_url == MEMORY:
        return
    with Connection(broker_url) as conn:
        queue = Queue(name, routing_key=name)(conn.default_channel)
        try:
            queue.purge()
            queue.delete()
            held_cancels(name)(conn.default_channel).delete()  # cancels sent while no server ran
            if broker_url.startswith("redis"):
                forget_unacked(conn.default_channel.client, name)
                forget_leases(conn.default_channel.client, name)
                for exchange in (broadcast_exchange(name).name, cancel_exchange(name).name):
                    conn.default_channel.client.delete(
                        f"_kombu.binding.{exchange}", f"_kombu.binding_permanent.{exchange}"
                    )
        except conn.connection_errors + conn.channel_errors:
            pass


def unacked_tags(client: Any, queue: str) -> list[Any]:
    """The delivery tags, in kombu's table of unacknowledged Redis messages (shared by
    every client of the database), of the messages servers took from ``queue``."""
    tags = []
    for tag, raw in client.hscan_iter("unacked"):
        try:
            routing_key = json.loads(raw)[2]
        except (ValueError, TypeError, IndexError):
            continue
        if routing_key == queue:
            tags.append(tag)
    return tags


def forget_leases(client: Any, queue: str) -> int:
    """Drop the leases on Redis (:mod:`kombu_rpc._transports.leases`) that name
    ``queue`` (of servers or proxies that died in the test: they would stay an hour);
    how many there were."""
    from kombu_rpc._transports.leases import LEASES

    found = [lease for lease in client.zrange(LEASES, 0, -1) if queue.encode() in lease]
    for lease in found:
        client.zrem(LEASES, lease)
    return len(found)


def forget_unacked(client: Any, queue: str) -> None:
    """Drop from kombu's table of unacknowledged Redis messages those taken from
    ``queue`` by a server that died before it acked them: another client would restore
    them to the queue, after the test deleted it, and the queue would stay for ever."""
    for tag in unacked_tags(client, queue):
        client.hdel("unacked", tag)
        client.zrem("unacked_index", tag)


@pytest.fixture
def serve(
    broker_url: str, registry: Registry, queue_name: str, servers: ExitStack
) -> Callable[..., RPCServer]:
    """Start a server in a thread (defaults: the test's broker, registry and queue);
    it is stopped when the test ends."""

    def start(**kwargs: Any) -> RPCServer:
        kwargs.setdefault("registry", registry)
        kwargs.setdefault("queue", queue_name)
        server = RPCServer(broker_url, **kwargs)
        servers.enter_context(server.running())
        return server

    return start


@pytest.fixture
def proxies(broker_url: str, queue_name: str) -> Iterator[Callable[..., RPCProxy]]:
    made: list[RPCProxy] = []

    def make(**kwargs: Any) -> RPCProxy:
        kwargs.setdefault("queue", queue_name)
        kwargs.setdefault("timeout", 10.0)
        made.append(RPCProxy(broker_url, **kwargs))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture
def proxy(proxies: Callable[..., RPCProxy]) -> RPCProxy:
    return proxies()


class LogWaiter(logging.Handler):
    """Sets an event when a record whose message contains ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = threading.Event()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.records.append(record)
            self.seen.set()


@pytest.fixture
def log_waiter() -> Iterator[Callable[[str], LogWaiter]]:
    logger = logging.getLogger("kombu_rpc")
    added: list[LogWaiter] = []
    old_level = logger.level
    logger.setLevel(logging.DEBUG)

    def watch(text: str) -> LogWaiter:
        waiter = LogWaiter(text)
        logger.addHandler(waiter)
        added.append(waiter)
        return waiter

    yield watch
    for waiter in added:
        logger.removeHandler(waiter)
    logger.setLevel(old_level)


# -- the shared brokers: left connected (and clean) -------------------------------------
# KOMBU_RPC_CHECK_SHARED_BROKERS=canary: canary connections must survive the run;
# =1 (CI): and the run must leave nothing of its own behind (see tests/shared_brokers.py).

_WATCH = pytest.StashKey[Any]()
_CHECK = os.environ.get("KOMBU_RPC_CHECK_SHARED_BROKERS", "")


def pytest_sessionstart(session: pytest.Session) -> None:
    if _CHECK in ("1", "canary"):
        from .shared_brokers import Watch

        session.stash[_WATCH] = Watch.start(tag_run=_CHECK == "1")


@pytest.hookimpl(trylast=True)  # after the session's fixtures were torn down
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    watch = session.stash.get(_WATCH, None)
    if watch is None:
        return
    problems, notes = watch.finish(leftovers=_CHECK == "1")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for note in notes:
            reporter.write_line(f"shared brokers: {note}", yellow=True)
        for problem in problems:
            reporter.write_line(f"shared brokers: {problem}", red=True)
    if problems:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
