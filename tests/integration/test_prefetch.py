"""``prefetch_multiplier``: a server takes ``concurrency * prefetch_multiplier``
requests from the broker ahead; the rest wait in the queue for any server."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from kombu import Connection

from kombu_rpc import ConfigurationError, RPCProxy, RPCServer

from ..conftest import Gate, unacked_tags

pytestmark = pytest.mark.timeout(60)
#: What a server takes ahead is counted in the broker's queue: memory:// has none to ask.
REAL_BROKERS_ONLY = True

CALLS = 12


def ready_in_queue(broker_url: str, queue: str) -> int:
    """Requests the broker still holds for any server (not taken by one)."""
    with Connection(broker_url) as conn:
        channel = conn.default_channel
        if broker_url.startswith("redis"):
            return int(channel.client.llen(queue))
        return int(channel.queue_declare(queue=queue, passive=True).message_count)


def all_arrived(broker_url: str, queue: str, proxy: RPCProxy, sent: int) -> bool:
    """True once every request ``proxy`` sent to ``queue`` is in the broker, waiting or
    taken by a server: on RabbitMQ once the broker confirmed them all; on Redis, where a
    thread publishes them, once the queue and kombu's table of the requests servers took
    and did not ack (shared by every client of the database) hold them all."""
    if not broker_url.startswith("redis"):
        return not proxy._client._link._unconfirmed  # type: ignore[attr-defined]
    with Connection(broker_url) as conn:
        client = conn.default_channel.client
        return int(client.llen(queue)) + len(unacked_tags(client, queue)) == sent


@pytest.mark.parametrize(("concurrency", "multiplier"), [(1, 1), (1, 4), (2, 3)])
def test_a_server_takes_concurrency_times_multiplier_requests_ahead(
    broker_url: str,
    serve: Callable[..., RPCServer],
    proxies: Callable[..., RPCProxy],
    gate: Gate,
    queue_name: str,
    concurrency: int,
    multiplier: int,
) -> None:
    # Given a server whose calls are all held, and more requests than it may take
    serve(concurrency=concurrency, prefetch_multiplier=multiplier)
    proxy = proxies(timeout=30)
    futures = [proxy.held.call_async(n) for n in range(CALLS)]
    gate.wait_entered(concurrency)
    # Then it takes concurrency x multiplier of them, and the broker keeps the rest
    # (on Redis a server fetches while it waits for messages: running its calls in the
    # consuming thread, it fetches none ahead of the one it runs)
    taken = 1 if broker_url.startswith("redis") and concurrency == 1 else concurrency * multiplier
    expected = CALLS - taken
    deadline = time.monotonic() + 10  # the requests are published meanwhile, on Redis by a thread
    # (a count seen before the last of them arrived may match by chance)
    while not (
        all_arrived(broker_url, queue_name, proxy, CALLS)
        and ready_in_queue(broker_url, queue_name) == expected
    ):
        ready = ready_in_queue(broker_url, queue_name)
        assert time.monotonic() < deadline, f"{ready} requests in the queue, not {expected}"
        time.sleep(0.05)
    watch_until = time.monotonic() + 0.5  # and takes no more while its calls are held
    while time.monotonic() < watch_until:
        assert ready_in_queue(broker_url, queue_name) == expected
        time.sleep(0.05)
    # When the calls are let go, every one is answered
    gate.released.set()
    assert [future.result(30) for future in futures] == list(range(CALLS))


@pytest.mark.parametrize("multiplier", [0, -1, 1.5, True])
def test_the_multiplier_is_a_positive_integer(multiplier: object) -> None:
    with pytest.raises(ConfigurationError, match="prefetch_multiplier"):
        RPCServer("memory://", prefetch_multiplier=multiplier)  # type: ignore[arg-type]


@pytest.mark.parametrize("multiplier", [1, 2])
def test_requests_a_busy_server_takes_ahead_wait_for_it_while_another_is_idle(
    broker_url: str,
    serve: Callable[..., RPCServer],
    proxies: Callable[..., RPCProxy],
    gate: Gate,
    queue_name: str,
    multiplier: int,
) -> None:
    # Given two servers of one queue, one of them running a call that is held
    busy = serve(prefetch_multiplier=multiplier)
    proxy = proxies(timeout=30)
    held = proxy.held.call_async("long")
    gate.wait_entered(1)
    serve(prefetch_multiplier=multiplier)
    # When short calls come meanwhile
    short = [proxy.echo.call_async(n) for n in range(6)]
    # Then the idle server answers all of them but the ones the busy server took ahead
    # of the held call (its prefetch beyond concurrency: multiplier - 1; on Redis a
    # server running its calls in the consuming thread takes none ahead)
    ahead = 0 if broker_url.startswith("redis") else busy.concurrency * (multiplier - 1)
    deadline = time.monotonic() + 10
    while sum(future.done() for future in short) < len(short) - ahead:
        assert time.monotonic() < deadline, f"{sum(f.done() for f in short)} short calls answered"
        time.sleep(0.01)
    assert ready_in_queue(broker_url, queue_name) == 0  # the others are held, not queued
    watch_until = time.monotonic() + 0.5  # and stay unanswered while the held call runs
    while time.monotonic() < watch_until:
        assert sum(not future.done() for future in short) == ahead
        time.sleep(0.05)
    # And those wait for the held call: answered only once it ends
    gate.released.set()
    assert held.result(10) == "long"
    assert [future.result(10) for future in short] == list(range(6))
