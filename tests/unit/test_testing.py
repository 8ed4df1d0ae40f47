"""kombu_rpc.testing: the helpers that work without pytest."""

from __future__ import annotations

import doctest
from collections.abc import Iterator

import pytest
from kombu import Connection
from kombu.transport import memory as kombu_memory

from kombu_rpc import ConfigurationError, MethodNotFound, Registry, RemoteError, default_registry, testing
from kombu_rpc._transports import memory as rpc_memory
from kombu_rpc.connection import connect
from kombu_rpc.testing import (
    Served,
    copy_registry,
    is_memory_broker,
    make_registry,
    reset_memory_transport,
    running_server,
    serving,
    unique_queue_name,
)


def add(a: int, b: int) -> int:
    return a + b


def fail(message: str) -> None:
    raise KeyError(message)


@pytest.fixture
def in_default_registry() -> Iterator[None]:
    """``add`` registered in the default registry as ``calc.add``, for one test."""
    default_registry.register(add, name="calc.add")
    yield
    default_registry.unregister("calc.add")


def test_serving_a_list_of_functions(broker_url: str) -> None:
    with serving([add, fail], broker_url) as served:
        server, proxy = served
        assert isinstance(served, Served)
        assert served.queue == server.queue == proxy.queue
        assert server.ready
        assert proxy.add(2, 3) == 5
        with pytest.raises(RemoteError) as info:
            proxy.fail("gone")
        assert info.value.exc_type == "KeyError"
    assert not server.ready


@pytest.mark.usefixtures("in_default_registry")
def test_functions_registered_with_remote_keep_their_name() -> None:
    with serving([add]) as (server, proxy):
        assert server.registry.names() == ["calc.add"]
        assert proxy.calc.add(1, 1) == 2


def test_serving_a_mapping_or_a_registry() -> None:
    assert make_registry({"math.sum": add}).names() == ["math.sum"]
    registry = Registry()
    assert make_registry(registry) is registry
    with serving(registry, queue=unique_queue_name("mine"), timeout=2.0, concurrency=2) as (server, proxy):
        assert server.registry is registry
        assert server.queue.startswith("mine.")
        assert (proxy.timeout, server.concurrency) == (2.0, 2)
        registry.register(add)  # served from the next call on
        assert proxy.add(4, 5) == 9
        with pytest.raises(MethodNotFound):
            proxy.fail("not registered")


@pytest.mark.parametrize("functions", ["add", b"add", add, 42, [42]])
def test_make_registry_refuses_what_it_cannot_serve(functions: object) -> None:
    with pytest.raises(ConfigurationError):
        make_registry(functions)  # type: ignore[arg-type]


@pytest.mark.usefixtures("in_default_registry")
def test_copy_registry_is_independent() -> None:
    copy = copy_registry()
    assert "calc.add" in copy
    copy.unregister("calc.add")
    copy.register(fail)
    assert "calc.add" in default_registry and "fail" not in default_registry
    assert copy_registry(copy).names() == ["fail"]


def test_unique_queue_names() -> None:
    names = {unique_queue_name() for _ in range(100)}
    assert len(names) == 100
    assert all(name.startswith("test.") for name in names)
    with pytest.raises(ConfigurationError):
        unique_queue_name("has space")


@pytest.mark.parametrize(
    ("broker", "expected"),
    [
        ("memory://", True),
        (Connection("memory://"), True),
        (connect("memory://"), True),
        ("amqp://guest:guest@127.0.0.1:5672//", False),
        ("redis://127.0.0.1:6379/0", False),
    ],
    ids=["url", "kombu-connection", "kombu_rpc-connection", "amqp", "redis"],
)
def test_is_memory_broker(broker: str | Connection, expected: bool) -> None:
    assert is_memory_broker(broker) is expected


def test_reset_memory_transport_drops_queues_exchanges_and_bindings() -> None:
    with connect("memory://") as conn, conn.SimpleQueue("reset-me") as queue:
        queue.put("stale")
    with Connection("memory://") as plain, plain.SimpleQueue("reset-me-too") as queue:
        queue.put("stale")
    assert {"reset-me", "reset-me-too"} <= set(kombu_memory.Channel.queues)
    assert kombu_memory.Transport.global_state.bindings
    reset_memory_transport()
    for channel in (kombu_memory.Channel, rpc_memory.Channel):
        assert channel.queues == {}
        assert not channel.events
    for transport in (kombu_memory.Transport, rpc_memory.Transport):
        state = transport.global_state
        assert (state.exchanges, state.bindings, dict(state.queue_index)) == ({}, {}, {})
    with serving([add]) as (_, proxy):  # the memory broker still works afterwards
        assert proxy.add(1, 2) == 3


def test_the_request_queue_is_deleted_on_exit_even_after_an_error(
    broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ZeroDivisionError), running_server([add], broker_url) as server:
        queue = server.queue
        1 / 0  # noqa: B018
    assert "could not delete the request queue" not in caplog.text
    with connect(broker_url) as conn:
        if broker_url.startswith("memory"):
            assert queue not in kombu_memory.Channel.queues
        elif broker_url.startswith("amqp"):
            with pytest.raises(conn.channel_errors):
                conn.default_channel.queue_declare(queue, passive=True)
        # redis: an empty list does not exist, so there is nothing more to check


def test_a_failed_cleanup_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    with running_server([add], "memory://", queue=unique_queue_name()) as server:
        unreachable = "amqp://guest:guest@127.0.0.1:1//"
        with caplog.at_level("WARNING", logger="kombu_rpc.testing"):
            testing._discard_request_queue(unreachable, server.queue)
    assert f"could not delete the request queue {server.queue!r}" in caplog.text


def test_the_module_example_runs() -> None:
    results = doctest.testmod(testing)
    assert results.attempted > 0
    assert results.failed == 0
