"""With ``concurrency > 1`` calls run in worker threads, but their requests are acked by
the consuming thread: it must learn at once that a worker finished (on AMQP, through a
socket pair), and still ack every call exactly once."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
from kombu.message import Message

from kombu_rpc import Registry, RPCProxy, RPCServer
from kombu_rpc import _consumer as consumer_module
from kombu_rpc.connection import connect

from ..conftest import Gate, Recorder, delete_queue

pytestmark = pytest.mark.timeout(120)


@pytest.mark.timeout(60)
def test_on_amqp_a_finished_call_is_acked_by_a_wake_up_not_a_timeout(
    amqp_url: str,
    registry: Registry,
    queue_name: str,
    gate: Gate,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No wait of the consume loop ends by itself within the test: a call is acked only
    # if its worker wakes the loop (polling until a timeout would leave it unacked).
    for name in ("IDLE_WAIT", "_POLL_MIN", "_POLL_MAX"):
        monkeypatch.setattr(consumer_module, name, 3600.0)
    acks = Recorder()
    ack = Message.ack

    def spy(message: Message, multiple: bool = False) -> None:
        ack(message, multiple)
        if (message.delivery_info or {}).get("routing_key") == queue_name:
            acks.add((message.properties or {}).get("correlation_id"))

    monkeypatch.setattr(Message, "ack", spy)
    # concurrency=3 with one call held: the loop never has every worker busy, so it
    # waits on the broker's socket (not for a free worker) while calls finish.
    server = RPCServer(amqp_url, registry=registry, queue=queue_name, concurrency=3)
    try:
        with server.running(), RPCProxy(amqp_url, queue=queue_name, timeout=10) as proxy:
            held = proxy.held.call_async("held")
            gate.wait_entered()
            for i in range(3):
                assert proxy.echo(i) == i
                acks.wait(i + 1, timeout=20)
            gate.released.set()
            assert held.result(timeout=10) == "held"
            assert len(set(acks.wait(4, timeout=20))) == 4
    finally:
        gate.released.set()
        delete_queue(amqp_url, queue_name)
    assert not server.ready


def test_many_concurrent_calls_run_once_each_and_the_server_stops_cleanly(
    broker_url: str, queue_name: str, proxy: RPCProxy, caplog: pytest.LogCaptureFixture
) -> None:
    runs: Counter[int] = Counter()
    lock = threading.Lock()
    reg = Registry()

    @reg.remote
    def square(x: int) -> int:
        with lock:
            runs[x] += 1
        return x * x

    calls = 300
    server = RPCServer(broker_url, registry=reg, queue=queue_name, concurrency=4)
    try:
        for start in (0, calls):  # a second run gets fresh wake-up sockets
            with server.running():
                pool = server._consumer.pool
                assert pool is not None
                values = range(start, start + calls)
                futures = [proxy.square.call_async(x) for x in values]
                assert [f.result(timeout=60) for f in futures] == [x * x for x in values]
            assert not server.ready
            assert server._consumer.pool is None
            assert pool.wake_r is None and pool.wake_w is None
        assert runs == Counter(range(2 * calls))  # each call ran exactly once
        assert "still running" not in caplog.text
        assert message_count(broker_url, queue_name) == 0  # all acked: none went back
    finally:
        delete_queue(broker_url, queue_name)


def message_count(broker_url: str, name: str) -> Any:
    """Messages ready in queue ``name`` (Redis has no empty queue: the list is gone)."""
    with connect(broker_url) as conn:
        try:
            return conn.default_channel.queue_declare(queue=name, passive=True).message_count
        except conn.channel_errors:
            if conn.transport.driver_type != "redis":
                raise
            return 0
