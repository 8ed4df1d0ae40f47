"""Broker faults on the real brokers: cut connections and a RabbitMQ restart.

Every fault is bounded and restores the broker. Run these alone with ``-m faults``.
"""

from __future__ import annotations

import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from time import monotonic
from typing import Any

import pytest

from kombu_rpc import RPCError, RPCProxy, RPCServer

from ..conftest import broker_id

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]
#: memory:// has no connections to cut: ``broker_url`` covers the real brokers only.
REAL_BROKERS_ONLY = True


def cut_connections(broker_url: str) -> None:
    """Drop every client connection the broker has (ours included)."""
    if broker_url.startswith("amqp"):
        subprocess.run(["rabbitmqctl", "-q", "close_all_connections", "fault test"], check=True, timeout=60)
    else:
        import redis

        client = redis.Redis.from_url(broker_url)
        client.client_kill_filter(_type="normal", skipme=True)
        client.close()


@pytest.fixture
def restart_rabbitmq() -> Iterator[Callable[[], None]]:
    def restart() -> None:
        subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=60)
        subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120)

    yield restart
    # whatever happened, leave RabbitMQ running
    subprocess.run(["rabbitmqctl", "-q", "start_app"], timeout=120)
    subprocess.run(["rabbitmqctl", "-q", "await_startup"], timeout=120)


def run_load(proxy: RPCProxy, fault: Callable[[], None], threads: int = 4) -> Counter[str]:
    """``threads`` callers call in a loop from before ``fault`` until 50 calls after it
    (or 30 s after it, if calls keep failing).

    Returns how the calls ended. A hung call fails the test: callers are bounded in
    count, and their calls in time by the proxy's timeout.
    """
    started = threading.Barrier(threads + 1, timeout=30)
    fault_done = threading.Event()
    fault_ended: list[float] = []
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def caller(thread: int) -> None:
        started.wait()
        after = 0
        for i in range(20_000):
            try:
                ok = proxy.echo([thread, i]) == [thread, i]
                outcome = "answered" if ok else "crossed"
            except RPCError as exc:
                outcome = f"error:{type(exc).__name__}"
            with lock:
                outcomes[outcome] += 1
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
    return outcomes


@pytest.mark.parametrize("concurrency", [1, 4])
def test_cut_connections_under_load_end_every_call_and_recover(
    broker_url: str,
    serve: Callable[..., RPCServer],
    proxies: Callable[..., RPCProxy],
    concurrency: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    serve(concurrency=concurrency)
    proxy = proxies(timeout=5)
    assert proxy.echo("before") == "before"
    # When the broker drops every connection while calls are in flight
    outcomes = run_load(proxy, lambda: cut_connections(broker_url))
    # Then every call ended (result or RPCError, none crossed, none hung) ...
    assert outcomes["crossed"] == 0 and outcomes["answered"] >= 4 * 50
    # ... and new calls succeed once both sides reconnected
    assert [proxy.echo(i) for i in range(20)] == list(range(20))
    with capsys.disabled():
        print(f"\n  cut under load, {broker_id(broker_url)}, concurrency={concurrency}: {dict(outcomes)}")


def test_cut_connections_while_idle(
    broker_url: str, serve: Callable[..., RPCServer], proxies: Callable[..., RPCProxy]
) -> None:
    serve()
    proxy = proxies(timeout=5)
    assert proxy.echo(1) == 1
    cut_connections(broker_url)
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
        assert outcomes["crossed"] == 0 and outcomes["answered"] >= 2 * 50
        assert [proxy.echo(i) for i in range(10)] == list(range(10))
    with capsys.disabled():
        print(f"\n  RabbitMQ restart under load: {dict(outcomes)}")
