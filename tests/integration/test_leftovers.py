"""Servers and proxies that stop leave nothing behind, on every broker: no queue,
exchange, binding or Redis key that lives for ever (a Redis reply list that expires by
itself is allowed: see ``RedisLink._discard``)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from kombu import Connection

from kombu_rpc import CallError, Registry, RPCProxy, RPCServer, RPCTimeout
from kombu_rpc._links.polling import LATE_REPLY_WINDOW, TOMBSTONE
from kombu_rpc._transports import memory as memory_transport
from kombu_rpc._transports.leases import LEASES
from kombu_rpc.topology import (
    BROADCAST_EXCHANGE_TEMPLATE,
    BROADCAST_QUEUE_TEMPLATE,
    CANCEL_EXCHANGE_TEMPLATE,
    CANCEL_QUEUE_TEMPLATE,
    CONTROL_QUEUE_TEMPLATE,
)

from ..conftest import MEMORY, Gate

pytestmark = pytest.mark.timeout(60)


class Broker:
    """What is on a broker, seen from connections of the test's own."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.redis = redis.Redis.from_url(url) if url.startswith("redis") else None

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()

    def has_queue(self, name: str) -> bool:
        """Whether queue ``name`` exists (on Redis: its list, which expires or not)."""
        if self.url == MEMORY:
            return name in memory_transport.Channel.queues
        if self.redis is not None:
            return bool(self.redis.exists(name))
        return self._amqp_exists(lambda channel: channel.queue_declare(queue=name, passive=True))

    def has_exchange(self, name: str) -> bool:
        """Whether exchange ``name`` exists, or on Redis (which keeps no exchanges)
        whether a binding table of it does."""
        if self.url == MEMORY:
            return name in memory_transport.Transport.global_state.exchanges
        if self.redis is not None:
            return bool(self.redis.exists(f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}"))
        return self._amqp_exists(
            lambda channel: channel.exchange_declare(exchange=name, type="fanout", passive=True)
        )

    def bindings_of(self, name: str) -> list[Any]:
        """memory://'s bindings with ``name`` in their queue or exchange."""
        assert self.url == MEMORY
        state = memory_transport.Transport.global_state
        return [key for key in state.bindings if name in key.queue or name in key.exchange]

    def lasting_keys(self, name: str) -> list[str]:
        """Redis keys with ``name`` in them that never expire."""
        assert self.redis is not None
        return [k.decode() for k in self.redis.scan_iter(match=f"*{name}*") if self.redis.pttl(k) == -1]

    def _amqp_exists(self, declare: Any) -> bool:
        with Connection(self.url) as conn:
            channel = conn.channel()  # a passive declare that fails closes its channel
            try:
                declare(channel)
            except conn.channel_errors:
                return False
            channel.close()
            return True


@pytest.fixture
def broker(broker_url: str) -> Iterator[Broker]:
    on = Broker(broker_url)
    yield on
    on.close()


MakeServer = Callable[[], RPCServer]


@pytest.fixture
def make_server(broker_url: str, registry: Registry, queue_name: str) -> MakeServer:
    """Servers of the test's queue, not started."""
    return lambda: RPCServer(broker_url, registry=registry, queue=queue_name)


def assert_reply_queue_gone_or_expiring(
    broker: Broker, proxy: RPCProxy, longest_ttl: float, replies: int | None = None
) -> None:
    """The closed proxy's reply queue is gone, or on Redis is a list that expires within
    ``longest_ttl`` seconds and holds the tombstone last, after the ``replies`` (if
    given) that came after close, and the proxy gave up its lease on it; the test then
    deletes it."""
    name = proxy.reply_queue
    if broker.redis is None:
        assert not broker.has_queue(name)
        return
    try:
        assert not [lease for lease in broker.redis.zrange(LEASES, 0, -1) if name.encode() in lease]
        ttl = broker.redis.pttl(name)
        assert 0 < ttl <= longest_ttl * 1000, ttl
        assert broker.redis.lindex(name, -1) == TOMBSTONE
        if replies is not None:
            assert broker.redis.llen(name) == replies + 1
    finally:
        broker.redis.delete(name)


@pytest.mark.parametrize("timeout", [30.0, None], ids=["deadline", "no-deadline"])
def test_a_proxy_closed_with_a_call_in_flight_leaves_no_reply_queue_for_ever(
    broker: Broker, make_server: MakeServer, queue_name: str, gate: Gate, timeout: float | None
) -> None:
    proxy = RPCProxy(broker.url, queue=queue_name, timeout=timeout)
    with make_server().running():
        try:
            future = proxy.held.call_async("late")
            gate.wait_entered()
            proxy.close()
            with pytest.raises(CallError, match="closed"):
                future.result(timeout=10)
            if broker.redis is not None:  # closed: the list already waits for the reply
                assert broker.redis.lrange(proxy.reply_queue, 0, -1) == [TOMBSTONE]
        finally:
            gate.released.set()
    # the server stopped once its call had ended and the reply was sent: on Redis it is
    # in the list, which kept its time to live
    assert_reply_queue_gone_or_expiring(broker, proxy, (timeout or 0) + LATE_REPLY_WINDOW, replies=1)


def test_the_late_reply_of_a_call_that_timed_out_before_close_leaves_nothing_for_ever(
    broker: Broker, make_server: MakeServer, queue_name: str, gate: Gate
) -> None:
    proxy = RPCProxy(broker.url, queue=queue_name, timeout=0.3)
    with make_server().running():
        try:
            with pytest.raises(RPCTimeout):
                proxy.held("late")
            proxy.close()
        finally:
            gate.released.set()
    assert_reply_queue_gone_or_expiring(broker, proxy, LATE_REPLY_WINDOW, replies=1)


def test_the_late_items_of_a_stream_stopped_before_close_leave_nothing_for_ever(
    broker: Broker, broker_url: str, queue_name: str
) -> None:
    registry = Registry()
    stopped = threading.Event()

    @registry.remote
    def endless() -> Iterator[int]:
        try:
            n = 0
            while True:
                n += 1
                yield n
        finally:
            stopped.set()

    with RPCServer(broker_url, registry=registry, queue=queue_name, concurrency=2).running():
        proxy = RPCProxy(broker.url, queue=queue_name, timeout=30)
        for item in proxy.endless.stream():
            if item == 3:
                break  # items keep coming until the server heard the cancel
        proxy.close()
        assert stopped.wait(10)
    assert_reply_queue_gone_or_expiring(broker, proxy, LATE_REPLY_WINDOW)


def test_the_late_replies_of_a_broadcast_leave_nothing_for_ever(
    broker: Broker, make_server: MakeServer, queue_name: str
) -> None:
    with make_server().running(), make_server().running():
        proxy = RPCProxy(broker.url, queue=queue_name, timeout=10)
        # the first reply ends the broadcast: the second may come after the close
        assert len(proxy["kombu_rpc.ping"].broadcast(timeout=5, expect=1)) >= 1
        proxy.close()
    assert_reply_queue_gone_or_expiring(broker, proxy, 5 + LATE_REPLY_WINDOW)


def test_a_proxy_whose_calls_were_all_answered_leaves_no_reply_queue(
    broker: Broker, make_server: MakeServer, queue_name: str
) -> None:
    with make_server().running():
        with RPCProxy(broker.url, queue=queue_name, timeout=10) as proxy:
            assert proxy.fib(10) == 55
        assert not broker.has_queue(proxy.reply_queue)


def test_stopped_servers_leave_no_queue_exchange_or_binding(
    broker: Broker, make_server: MakeServer, queue_name: str
) -> None:
    first, second = make_server(), make_server()
    exchange = BROADCAST_EXCHANGE_TEMPLATE.format(queue=queue_name)
    with second.running(), RPCProxy(broker.url, queue=queue_name, timeout=10) as proxy:
        with first.running():
            assert len(proxy["kombu_rpc.ping"].broadcast(timeout=10, expect=2)) == 2
        # the first is gone, with its own queues; the exchange stays for the second
        assert not broker.has_queue(CONTROL_QUEUE_TEMPLATE.format(server_id=first.server_id))
        assert not broker.has_queue(
            BROADCAST_QUEUE_TEMPLATE.format(queue=queue_name, server_id=first.server_id)
        )
        assert broker.has_exchange(exchange)
        [reply] = proxy["kombu_rpc.ping"].broadcast(timeout=10, expect=1)
        assert reply.server_id == second.server_id
    for server in (first, second):
        assert not broker.has_queue(CONTROL_QUEUE_TEMPLATE.format(server_id=server.server_id))
        assert not broker.has_queue(
            BROADCAST_QUEUE_TEMPLATE.format(queue=queue_name, server_id=server.server_id)
        )
        assert not broker.has_queue(
            CANCEL_QUEUE_TEMPLATE.format(queue=queue_name, server_id=server.server_id)
        )
    assert not broker.has_exchange(exchange)  # with its last queue: auto-delete
    assert not broker.has_exchange(CANCEL_EXCHANGE_TEMPLATE.format(queue=queue_name))
    if broker.url == MEMORY:
        assert broker.bindings_of(queue_name) == []
    if broker.redis is not None:
        assert broker.lasting_keys(first.server_id) == broker.lasting_keys(second.server_id) == []
        assert broker.lasting_keys(queue_name) == []


def test_a_broadcast_with_no_server_leaves_no_exchange(broker: Broker, queue_name: str) -> None:
    with RPCProxy(broker.url, queue=queue_name, timeout=10) as proxy:
        assert proxy["kombu_rpc.ping"].broadcast(timeout=0.5) == []
    assert not broker.has_exchange(BROADCAST_EXCHANGE_TEMPLATE.format(queue=queue_name))
    if broker.redis is not None:
        assert broker.lasting_keys(queue_name) == []


def test_the_demo_leaves_no_queue(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    from kombu_rpc import _cli, topology

    demo_id = topology.new_id()
    monkeypatch.setattr(topology, "new_id", lambda: demo_id)  # the queue it makes: kombu_rpc.demo.<id>
    assert _cli.main(["demo", "--broker", broker.url, "--calls", "5"]) == 0
    assert not broker.has_queue(f"kombu_rpc.demo.{demo_id}")
    if broker.redis is not None:  # (an empty list is no key on Redis)
        assert broker.lasting_keys(demo_id) == []
