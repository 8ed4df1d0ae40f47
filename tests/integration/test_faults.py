"""Broker faults: cut connections and a RabbitMQ restart, and TCP faults.

The cuts and the restart hit private nodes that the run starts for them
(``private_rabbit``, ``private_redis``: see ``tests/brokers.py``), never the shared
brokers, which other programs use. The TCP faults run on the shared brokers: they only
reset or stall the connections that go through their own loopback forwarder.

Every fault is bounded and restores the broker. Run these alone with ``-m faults``.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from time import monotonic
from typing import Any

import pytest

from kombu_rpc import RPCError, RPCProxy, RPCServer

from ..brokers import PrivateNode, PrivateRabbit
from ..conftest import broker_id, delete_queue
from .tcpproxy import TCPProxy

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]
#: memory:// has no connections to cut: ``broker_url`` covers the real brokers only.
REAL_BROKERS_ONLY = True

#: The private node fixture for each kind of broker.
PRIVATE_NODES = {"amqp": "private_rabbit", "redis": "private_redis"}


def private_node_for(request: pytest.FixtureRequest, url: str) -> PrivateNode:
    """The private node of the same kind as ``url`` (started at first use)."""
    kind = "amqp" if "amqp" in broker_id(url) else "redis" if "redis" in broker_id(url) else ""
    if not kind:
        pytest.skip(f"no private node for {broker_id(url)}:// brokers")
    node: PrivateNode = request.getfixturevalue(PRIVATE_NODES[kind])
    return node


@pytest.fixture
def broker_url(request: pytest.FixtureRequest) -> str:
    """Overrides the shared broker of ``tests/conftest.py`` (parametrized the same way:
    one test per real broker kind, ids ``[amqp]``, ``[redis]``) with the private node of
    its kind, so that the ``serve`` and ``proxies`` fixtures use that node."""
    return private_node_for(request, request.param).url


@pytest.fixture
def amqp_url(request: pytest.FixtureRequest) -> str:
    """The private RabbitMQ node's URL, for the AMQP-only tests."""
    return private_node_for(request, request.param).url


@pytest.fixture
def private_node(request: pytest.FixtureRequest, broker_url: str) -> PrivateNode:
    """The private node behind this test's ``broker_url``."""
    return private_node_for(request, broker_url)


@pytest.fixture
def shared_broker_url(real_broker_url: str, queue_name: str) -> Iterator[str]:
    """A shared broker (``real_broker_url``, one test per kind), for tests that only
    harm connections of their own. The test's request queue is deleted afterwards:
    servers never delete theirs."""
    yield real_broker_url
    delete_queue(real_broker_url, queue_name)


@pytest.fixture
def restart_rabbitmq(private_rabbit: PrivateRabbit) -> Iterator[Callable[[], None]]:
    yield private_rabbit.restart
    # whatever happened, leave the node running for the next tests
    private_rabbit.ensure_running()


class Load:
    """How the calls of :func:`run_load` ended, by outcome, as they end."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.cond = threading.Condition()

    def add(self, outcome: str) -> None:
        with self.cond:
            self.outcomes[outcome] += 1
            self.cond.notify_all()

    def wait_for(self, outcome: str, count: int, timeout: float = 30) -> None:
        """Wait until ``count`` calls ended with ``outcome``."""
        with self.cond:
            assert self.cond.wait_for(lambda: self.outcomes[outcome] >= count, timeout), dict(self.outcomes)


def run_load(
    proxy: RPCProxy, fault: Callable[[], None], threads: int = 4, load: Load | None = None
) -> Counter[str]:
    """``threads`` callers call in a loop from before ``fault`` until 50 calls after it
    (or 30 s after it, if calls keep failing).

    Returns how the calls ended. A hung call fails the test: callers are bounded in
    count, and their calls in time by the proxy's timeout. A call that ends more than
    a second past its timeout counts as ``late``.
    """
    assert proxy.timeout is not None
    limit = proxy.timeout + 1.0
    load = load or Load()
    started = threading.Barrier(threads + 1, timeout=30)
    fault_done = threading.Event()
    fault_ended: list[float] = []

    def caller(thread: int) -> None:
        started.wait()
        after = 0
        for i in range(20_000):
            began = monotonic()
            try:
                ok = proxy.echo([thread, i]) == [thread, i]
                outcome = "answered" if ok else "crossed"
            except RPCError as exc:
                outcome = f"error:{type(exc).__name__}"
            load.add("late" if monotonic() - began > limit else outcome)
            if fault_done.is_set():
                after += 1
                if after == 50 or monotonic() > fault_ended[0] + 30:
                    return

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(caller, t) for t in range(threads)]
        started.wait()
        try:
            fault()
        finally:
            fault_ended.append(monotonic())
            fault_done.set()
        done, hung = wait(futures, timeout=90)
    assert not hung, f"{len(hung)} callers hung"
    for future in done:
        future.result()
    return load.outcomes


@pytest.mark.parametrize("concurrency", [1, 4])
def test_cut_connections_under_load_end_every_call_and_recover(
    broker_url: str,
    private_node: PrivateNode,
    serve: Callable[..., RPCServer],
    proxies: Callable[..., RPCProxy],
    concurrency: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    serve(concurrency=concurrency)
    proxy = proxies(timeout=5)
    assert proxy.echo("before") == "before"
    # When the broker drops every connection while calls are in flight
    outcomes = run_load(proxy, private_node.close_all_connections)
    # Then every call ended (result or RPCError, none crossed, none late, none hung);
    # calls caught by the cut may fail (on Redis, a request taken by the server before
    # the cut returns only after the visibility timeout: its call times out) ...
    assert outcomes["crossed"] == outcomes["late"] == 0 and outcomes["answered"] >= 4 * 40
    # ... and new calls succeed once both sides reconnected
    assert [proxy.echo(i) for i in range(20)] == list(range(20))
    with capsys.disabled():
        print(f"\n  cut under load, {broker_id(broker_url)}, concurrency={concurrency}: {dict(outcomes)}")


def test_cut_connections_while_idle(
    private_node: PrivateNode, serve: Callable[..., RPCServer], proxies: Callable[..., RPCProxy]
) -> None:
    serve()
    proxy = proxies(timeout=5)
    assert proxy.echo(1) == 1
    private_node.close_all_connections()
    assert [proxy.echo(i) for i in range(5)] == list(range(5))


def test_rabbitmq_restart_mid_load(
    amqp_url: str,
    registry: Any,
    queue_name: str,
    restart_rabbitmq: Callable[[], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = RPCServer(amqp_url, registry=registry, queue=queue_name, concurrency=2, durable=True)
    with server.running(), RPCProxy(amqp_url, queue=queue_name, timeout=5) as proxy:
        assert proxy.echo("before") == "before"
        outcomes = run_load(proxy, restart_rabbitmq, threads=2)
        assert outcomes["crossed"] == outcomes["late"] == 0 and outcomes["answered"] >= 2 * 40
        assert [proxy.echo(i) for i in range(10)] == list(range(10))
    with capsys.disabled():
        print(f"\n  RabbitMQ restart under load (private node): {dict(outcomes)}")


@pytest.mark.parametrize("side", ["proxy", "server"])
@pytest.mark.parametrize("fault", ["sever", "stall"])
def test_tcp_fault_under_load_ends_every_call_by_its_timeout(
    shared_broker_url: str,
    registry: Any,
    queue_name: str,
    side: str,
    fault: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One side reaches the broker through a loopback TCP proxy, which resets its
    connections or stalls them (no byte moves, no error: a silent network partition).

    This runs on the shared broker: only the connections through the TCP proxy, all of
    them this test's own, see the fault.
    """
    broker_url = shared_broker_url
    with TCPProxy.for_url(broker_url) as tcp:
        via = tcp.url(broker_url)
        server = RPCServer(via if side == "server" else broker_url, registry=registry, queue=queue_name)
        proxy = RPCProxy(via if side == "proxy" else broker_url, queue=queue_name, timeout=2)
        with server.running(), proxy:
            assert proxy.echo("before") == "before"
            assert tcp.connections >= 1  # the traffic goes through the TCP proxy
            accepted = tcp.accepted
            load = Load()

            def partition() -> None:
                if fault == "sever":
                    tcp.sever()
                    return
                tcp.stall()  # until every caller has seen a call time out in the stall
                try:
                    load.wait_for("error:RPCTimeout", 4)
                finally:
                    tcp.resume()

            outcomes = run_load(proxy, partition, load=load)
            # Every call ended on time, none crossed, and calls succeed afterwards (calls
            # caught by the fault may fail: see the cut test)
            assert outcomes["crossed"] == outcomes["late"] == 0 and outcomes["answered"] >= 4 * 40
            assert [proxy.echo(i) for i in range(10)] == list(range(10))
            if fault == "sever":  # the side behind the proxy reconnected
                assert tcp.accepted > accepted
    with capsys.disabled():
        print(f"\n  {fault} the {side}'s connections, {broker_id(broker_url)}: {dict(outcomes)}")
