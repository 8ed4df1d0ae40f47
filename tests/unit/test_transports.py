"""kombu_rpc._transports: which transport a URL gets, the checks of kombu's internals and
the fallback to kombu's own transports, and connections that leave the caller's alone."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import amqp.transport
import pytest
from kombu import Connection, Queue
from kombu.transport import filesystem as kombu_filesystem
from kombu.transport import memory as kombu_memory
from kombu.transport import pyamqp as kombu_pyamqp
from kombu.transport import redis as kombu_redis

from kombu_rpc import ConfigurationError, RPCProxy, RPCServer
from kombu_rpc import _transports as seam
from kombu_rpc._transports import Kind, kind, leases
from kombu_rpc._transports import amqp as fast_amqp
from kombu_rpc._transports import filesystem as fast_filesystem
from kombu_rpc._transports import memory as fast_memory
from kombu_rpc._transports import redis as fast_redis
from kombu_rpc.connection import connect, safe_uri
from kombu_rpc.errors import TransportFallbackWarning
from kombu_rpc.testing import make_registry, unique_queue_name

pytestmark = pytest.mark.timeout(30)

AMQP, REDIS = "amqp://guest:guest@127.0.0.1:5672//", "redis://127.0.0.1:6379/0"


@pytest.fixture
def fresh_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Forget which fast transports passed their checks (and again afterwards)."""
    monkeypatch.setattr(seam, "_checked", {})
    yield


def transport_of(url: str) -> Any:
    return connect(url).transport_cls


def test_each_url_gets_its_transport_and_kind() -> None:
    assert transport_of("memory://") is fast_memory.Transport
    assert transport_of(AMQP) is fast_amqp.Transport
    assert transport_of("pyamqp://guest@127.0.0.1//") is fast_amqp.Transport
    assert transport_of(REDIS) is fast_redis.Transport
    assert transport_of("redis+socket:///tmp/redis.sock") is fast_redis.SocketTransport
    assert transport_of("filesystem://") is fast_filesystem.Transport
    assert transport_of("rediss://127.0.0.1:6380/0") == "rediss"  # TLS: kombu's own
    expected = {
        "memory://": Kind.MEMORY,
        AMQP: Kind.AMQP,
        "amqps://127.0.0.1//": Kind.AMQP,
        REDIS: Kind.REDIS,
        "redis+socket:///tmp/redis.sock": Kind.REDIS,
        "sentinel://127.0.0.1:26379": Kind.REDIS,
        "filesystem://": Kind.POLLING,
    }
    assert {url: kind(connect(url)) for url in expected} == expected


def test_a_connection_given_with_kombus_class_gets_kombu_rpcs() -> None:
    for stock, fast in [
        (kombu_pyamqp.Transport, fast_amqp.Transport),
        (kombu_redis.Transport, fast_redis.Transport),
        (kombu_memory.Transport, fast_memory.Transport),
    ]:
        assert connect(Connection(transport=stock, hostname="127.0.0.1")).transport_cls is fast


def test_redis_socket_urls_keep_their_path() -> None:
    conn = connect("redis+socket:///run/redis/redis.sock")
    assert conn.hostname == "socket:///run/redis/redis.sock"
    assert conn.clone().transport_cls is fast_redis.SocketTransport
    assert conn.clone().hostname == "socket:///run/redis/redis.sock"


@pytest.mark.parametrize(
    "url",
    [REDIS, "memory://", AMQP, "sqla+sqlite:///:memory:"],
    ids=["redis", "memory", "amqp", "sqlite"],
)
def test_connect_never_changes_the_callers_connection(url: str) -> None:
    if url.startswith("sqla") and importlib.util.find_spec("sqlalchemy") is None:
        pytest.skip("SQLAlchemy is not installed")
    options = {"polling_interval": 0.2, "custom": 1}
    given = Connection(url, transport_options=options)
    before = (given.transport_cls, given.as_uri(), dict(options))
    conn = connect(given)
    conn.clone().transport_options["added"] = True  # the copy is ours
    assert (given.transport_cls, given.as_uri(), options) == before
    assert given.transport_options is options
    assert conn.transport_options is not options


def test_redis_gets_socket_timeouts_in_its_own_options() -> None:
    assert connect(REDIS).transport_options == {"socket_timeout": 10.0, "socket_connect_timeout": 5.0}
    assert (
        connect(Connection(REDIS, transport_options={"socket_timeout": 2})).transport_options[
            "socket_timeout"
        ]
        == 2
    )
    # and only Redis: another transport might refuse them (SQLAlchemy's create_engine does)
    assert connect(AMQP).transport_options == {}
    assert connect("filesystem://").transport_options == {}


def test_urls_naming_a_database_driver_keep_it() -> None:
    if importlib.util.find_spec("sqlalchemy") is None:
        pytest.skip("SQLAlchemy is not installed")
    conn = connect("sqla+postgresql+psycopg2://user:secret@127.0.0.1/db").clone()
    assert kind(conn) is Kind.POLLING and conn.transport.polling_interval == seam.POLLING_INTERVAL
    assert safe_uri(conn) == "sqla+postgresql+psycopg2://user:**@127.0.0.1/db"


def test_polling_transports_poll_at_kombu_rpcs_interval_or_the_one_given() -> None:
    conn = connect("filesystem://")
    assert conn.transport.polling_interval == seam.POLLING_INTERVAL
    assert conn.clone().transport.polling_interval == seam.POLLING_INTERVAL
    given = connect(Connection("filesystem://", transport_options={"polling_interval": 0.3}))
    assert given.transport.polling_interval == 0.3
    assert "polling_interval" not in given.transport_options  # not passed on to kombu's client
    assert connect(given).transport.polling_interval == 0.3  # connecting again keeps it
    with pytest.raises(ConfigurationError, match="polling_interval"):
        connect(Connection("filesystem://", transport_options={"polling_interval": "often"}))


def test_redis_without_redis_py_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "redis" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    for url in (REDIS, "redis+socket:///tmp/r.sock", "rediss://h", "sentinel://h"):
        with pytest.raises(
            ConfigurationError,
            match=r"needs redis, .*pip install 'redis>=5.2,<9' \(pip install -e '\.\[redis\]'",
        ):
            connect(url)
    assert kind(connect("memory://")) is Kind.MEMORY  # the others are unaffected


def test_every_fast_transport_passes_its_check_on_the_installed_kombu() -> None:
    checks = [fast_amqp.check(), fast_redis.check(), fast_memory.check(), fast_filesystem.check()]
    assert checks == [None, None, None, None]
    assert leases.check() is None


def test_servers_hold_leases_on_redis_only_where_a_sweep_can_work(monkeypatch: pytest.MonkeyPatch) -> None:
    queues = [Queue("kombu_rpc.server.x", routing_key="kombu_rpc.server.x")]
    redis_conn, memory_conn = connect(REDIS), connect("memory://")
    channel = SimpleNamespace(global_keyprefix="")  # what a lease looks at before any I/O
    try:
        assert isinstance(seam.lease(redis_conn, channel, "x", queues), leases.Lease)
        assert seam.lease(memory_conn, memory_conn.default_channel, "x", queues) is None
        channel.global_keyprefix = "app:"  # kombu versions prefix Lua script keys differently
        assert seam.lease(redis_conn, channel, "x", queues) is None
        channel.global_keyprefix = ""
        monkeypatch.delattr(kombu_redis.Channel, "_delete")
        problem = leases.check()  # falls to the virtual channel's _delete(queue, *args)
        assert problem is not None and problem.startswith("kombu.transport.redis.Channel._delete takes")
        monkeypatch.setattr(leases, "_PROBLEM", problem)
        assert seam.lease(redis_conn, channel, "x", queues) is None
    finally:
        redis_conn.release()
        memory_conn.release()


def break_amqp(monkeypatch: pytest.MonkeyPatch) -> None:
    """py-amqp without the errno set the buffered transport reads errors with."""
    monkeypatch.delattr(amqp.transport, "_UNAVAIL")


def break_amqp_behaviour(monkeypatch: pytest.MonkeyPatch) -> None:
    """py-amqp whose transport setup no longer sets up its read buffer."""
    monkeypatch.setattr(amqp.transport.TCPTransport, "_setup_transport", lambda self: None)


def break_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """kombu whose Redis channel takes its client under another name."""
    monkeypatch.setattr(kombu_redis.Channel, "conn_or_acquire", lambda self, connection=None: None)


def break_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(kombu_memory.Channel, "_put_fanout")


def break_filesystem(monkeypatch: pytest.MonkeyPatch) -> None:
    """kombu whose filesystem channel puts a message under other names."""
    monkeypatch.setattr(kombu_filesystem.Channel, "_put", lambda self, name, message, **kwargs: None)


@pytest.mark.parametrize(
    "url, breaks, stock",
    [
        (AMQP, break_amqp, "amqp"),
        (AMQP, break_amqp_behaviour, "amqp"),
        (REDIS, break_redis, "redis"),
        ("memory://", break_memory, "memory"),
        ("filesystem://", break_filesystem, "filesystem"),
    ],
    ids=["amqp-missing", "amqp-behaviour", "redis-signature", "memory-missing", "filesystem-signature"],
)
def test_a_failed_check_falls_back_to_kombus_transport_with_one_warning(
    fresh_checks: None, monkeypatch: pytest.MonkeyPatch, url: str, breaks: Any, stock: Any
) -> None:
    breaks(monkeypatch)
    with pytest.warns(TransportFallbackWarning, match="using kombu's own transport") as caught:
        conn = connect(url)
    assert len(caught) == 1
    got = conn.transport_cls
    assert got == stock
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process
        connect(url)


def test_calls_work_on_kombus_memory_transport_after_a_fallback(
    fresh_checks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    break_memory(monkeypatch)
    with pytest.warns(TransportFallbackWarning):
        conn = connect("memory://")
    assert kind(conn) is Kind.POLLING
    monkeypatch.undo()  # kombu's memory transport needs what was taken away
    queue = unique_queue_name()
    with RPCServer(conn, registry=make_registry({"add": lambda a, b: a + b}), queue=queue).running():
        with RPCProxy(conn, queue=queue, timeout=10) as proxy:
            assert [proxy.add(i, 1) for i in range(5)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_the_switch_turns_kombu_rpcs_transports_off(
    fresh_checks: None, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(seam.FAST_TRANSPORTS_ENV, value)
    assert transport_of(AMQP) == "amqp"
    assert transport_of(REDIS) == "redis"
    assert transport_of("memory://") == "memory"
    assert transport_of("filesystem://") == "filesystem"
    queue = unique_queue_name()
    with RPCServer("memory://", registry=make_registry({"neg": lambda a: -a}), queue=queue).running():
        with RPCProxy("memory://", queue=queue, timeout=10) as proxy:
            assert proxy.neg(3) == -3
