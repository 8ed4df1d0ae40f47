"""kombu_rpc.metrics counts what servers and proxies do, on every broker."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry

from kombu_rpc import (
    ConnectionLostError,
    MethodNotFound,
    NoServerError,
    Registry,
    RemoteError,
    RPCProxy,
    RPCServer,
    RPCTimeout,
    metrics,
)
from kombu_rpc.testing import unique_queue_name

from ..conftest import Gate
from .conftest import refusing_queue
from .tcpproxy import TCPProxy

pytestmark = pytest.mark.timeout(60)

Serve = Callable[..., RPCServer]
MakeProxy = Callable[..., RPCProxy]


@pytest.fixture
def counted() -> Iterator[CollectorRegistry]:
    """Metrics on, on a registry of the test's own."""
    reg = CollectorRegistry()
    metrics.enable(reg)
    yield reg
    metrics.disable()


def wait_value(reg: CollectorRegistry, name: str, labels: dict[str, str], expected: float) -> None:
    """Wait until the sample ``name{labels}`` is ``expected`` (a proxy's counts land
    when its futures' callbacks ran, maybe just after the caller got its result)."""
    deadline = time.monotonic() + 10
    while (value := reg.get_sample_value(name, labels)) != expected:
        if time.monotonic() > deadline:
            pytest.fail(f"{name}{labels} is {value}, not {expected}")
        time.sleep(0.01)


def test_calls_are_counted_on_both_sides(
    serve: Serve, proxies: MakeProxy, counted: CollectorRegistry
) -> None:
    serve()
    proxy = proxies()
    queue = proxy.queue
    for n in (1, 2, 3):
        proxy.fib(n)
    with pytest.raises(RemoteError):
        proxy.boom()
    with pytest.raises(MethodNotFound):
        proxy.nope()

    def server(method: str, outcome: str) -> dict[str, str]:
        return {"queue": queue, "method": method, "outcome": outcome}

    value = counted.get_sample_value
    # the server counts before it replies
    assert value("kombu_rpc_server_calls_total", server("fib", "ok")) == 3
    assert value("kombu_rpc_server_calls_total", server("boom", "error")) == 1
    assert value("kombu_rpc_server_calls_total", server("", "refused")) == 1  # no caller-chosen label
    assert value("kombu_rpc_server_call_duration_seconds_count", {"queue": queue, "method": "fib"}) == 3
    assert value("kombu_rpc_server_queue_wait_seconds_count", {"queue": queue}) == 4  # refused: never ran
    assert value("kombu_rpc_server_calls_in_flight", {"queue": queue}) == 0
    wait_value(counted, "kombu_rpc_client_calls_total", server("fib", "ok"), 3)
    wait_value(counted, "kombu_rpc_client_calls_total", server("boom", "remote_error"), 1)
    wait_value(counted, "kombu_rpc_client_calls_total", server("nope", "remote_error"), 1)
    wait_value(counted, "kombu_rpc_client_calls_in_flight", {"queue": queue}, 0)
    assert value("kombu_rpc_client_call_duration_seconds_count", {"queue": queue, "method": "fib"}) == 3
    # casts are no calls a proxy waits for; a cast's run counts on the server
    proxy.record.cast("x")
    wait_value(counted, "kombu_rpc_server_calls_total", server("record", "ok"), 1)
    assert value("kombu_rpc_client_calls_total", server("record", "ok")) is None


def test_a_timeout_and_its_late_reply_are_counted(
    serve: Serve, proxies: MakeProxy, gate: Gate, counted: CollectorRegistry
) -> None:
    serve()
    proxy = proxies().options(timeout=0.5)
    with pytest.raises(RPCTimeout):
        proxy.held("late")
    wait_value(
        counted,
        "kombu_rpc_client_calls_total",
        {"queue": proxy.queue, "method": "held", "outcome": "timeout"},
        1,
    )
    # When the server finishes the call, its reply arrives after the deadline
    gate.released.set()
    wait_value(
        counted, "kombu_rpc_server_calls_total", {"queue": proxy.queue, "method": "held", "outcome": "ok"}, 1
    )
    proxy.fib(1)  # the proxy reads on: the late reply comes in before or with this one
    wait_value(counted, "kombu_rpc_client_dropped_replies_total", {"reason": "late"}, 1)


def test_a_call_nobody_serves_counts_as_no_server(amqp_url: str, counted: CollectorRegistry) -> None:
    queue = unique_queue_name("test.metrics.none")
    with RPCProxy(amqp_url, queue=queue, timeout=10) as proxy, pytest.raises(NoServerError):
        proxy.fib(1)
    labels = {"queue": queue, "method": "fib", "outcome": "no_server"}
    wait_value(counted, "kombu_rpc_client_calls_total", labels, 1)


def wait_at_least(reg: CollectorRegistry, name: str, labels: dict[str, str], least: float) -> None:
    deadline = time.monotonic() + 30
    while (reg.get_sample_value(name, labels) or 0) < least:
        if time.monotonic() > deadline:
            pytest.fail(f"{name}{labels} is {reg.get_sample_value(name, labels)}, not >= {least}")
        time.sleep(0.05)


def call_until_served(proxy: RPCProxy) -> None:
    """Call until a call succeeds (calls in flight at a cut may fail), for 30 s."""
    deadline = time.monotonic() + 30
    while True:
        try:
            assert proxy.fib(5) == 5
            return
        except (ConnectionLostError, RPCTimeout):
            if time.monotonic() > deadline:
                raise


def test_lost_connections_count_as_reconnects(
    real_broker_url: str, registry: Registry, queue_name: str, counted: CollectorRegistry
) -> None:
    with TCPProxy.for_url(real_broker_url) as tcp:
        # Given a server and a proxy that reach the broker through a TCP proxy
        url = tcp.url(real_broker_url)
        server = RPCServer(url, registry=registry, queue=queue_name)
        with server.running(), RPCProxy(url, queue=queue_name, timeout=5) as proxy:
            call_until_served(proxy)
            # When their connections are cut
            tcp.sever()
            # Then both count a reconnect (the proxy notices when it next reads)
            proxy.fib.call_async(5)
            wait_at_least(counted, "kombu_rpc_server_reconnects_total", {"queue": queue_name}, 1)
            wait_at_least(counted, "kombu_rpc_client_reconnects_total", {}, 1)


def test_a_request_left_unacked_at_stop_counts_as_a_redelivery(
    real_broker_url: str, registry: Registry, gate: Gate, queue_name: str, counted: CollectorRegistry
) -> None:
    # (Not on memory://: kombu's memory transport does not put back a closed channel's
    # unacked messages; there the first server's worker still answers, in-process.)
    broker_url = real_broker_url
    # Given a server that stops while a call of its runs (it leaves the request unacked)
    first = RPCServer(broker_url, registry=registry, queue=queue_name, concurrency=2)
    first.shutdown_timeout = 0.2
    with RPCProxy(broker_url, queue=queue_name, timeout=30) as proxy:
        with first.running():
            future = proxy.held.call_async("again")
            gate.wait_entered()
        # When another server takes over, the broker gives it the request again
        gate.released.set()
        second = RPCServer(broker_url, registry=registry, queue=queue_name)
        with second.running():
            # Then it is counted as a redelivery, and the call is answered
            assert future.result(30) == "again"
            wait_at_least(counted, "kombu_rpc_server_redeliveries_total", {"queue": queue_name}, 1)
            if broker_url.startswith("redis"):
                # On Redis the first server's worker answered too: the proxy reads that
                # duplicate (and drops it) before it closes, or it would outlive the proxy
                read_until_dropped(proxy, counted)


def read_until_dropped(proxy: RPCProxy, counted: CollectorRegistry) -> None:
    """Make calls, which read the proxy's replies, until a late reply was dropped."""
    deadline = time.monotonic() + 30
    while not counted.get_sample_value("kombu_rpc_client_dropped_replies_total", {"reason": "late"}):
        assert time.monotonic() < deadline, "the duplicate reply never came"
        assert proxy.fib(1) == 1


def test_requests_the_broker_refuses_count_as_publish_nacks(
    amqp_url: str, queue_name: str, counted: CollectorRegistry
) -> None:
    # Given a queue that refuses every message
    with (
        refusing_queue(amqp_url, queue_name),
        RPCProxy(amqp_url, queue=queue_name, timeout=30) as proxy,
        pytest.raises(ConnectionLostError),
    ):
        proxy.fib(1)
    # Then each refusal counts (the request is published again up to three times)
    wait_at_least(counted, "kombu_rpc_client_publish_nacks_total", {}, 1)
    labels = {"queue": queue_name, "method": "fib", "outcome": "connection_lost"}
    wait_value(counted, "kombu_rpc_client_calls_total", labels, 1)
