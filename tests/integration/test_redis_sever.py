"""A server and a proxy on Redis serve again after their TCP connections are cut.

A cut could leave the server's old channel half-closed (kombu's Redis ``close()``
talks to Redis first, and fails on the dead connection), its reset pub/sub socket still
in the poller that the channel replacing it shares: reported first at every poll, it
kept the new channel's BRPOP reply from ever being read, and every call timed out
(kombu logged "Requeuing undeliverable message ... No consumers" when the server
stopped, with the request that BRPOP had taken).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from time import monotonic, sleep
from typing import Any

import pytest
import redis
from kombu.transport import redis as kombu_redis

from kombu_rpc import Registry, RPCProxy, RPCServer, RPCTimeout
from kombu_rpc._links.polling import TOMBSTONE
from kombu_rpc._transports import FAST_TRANSPORTS_ENV
from kombu_rpc.errors import ConnectionLostError

from .tcpproxy import TCPProxy

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=["kombu_rpc", "kombu"])
def redis_url(request: pytest.FixtureRequest, real_broker_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The Redis broker, on kombu_rpc's Redis transport and on kombu's own."""
    if not real_broker_url.startswith("redis://"):
        pytest.skip("cuts the TCP connections of a redis:// broker")
    if request.param == "kombu":
        monkeypatch.setenv(FAST_TRANSPORTS_ENV, "0")
    return real_broker_url


def test_redis_serves_again_after_a_cut(redis_url: str, registry: Registry, queue_name: str) -> None:
    # The cut lands wherever the server is: often it has not acked yet (see below).
    with TCPProxy.for_url(redis_url) as tcp:
        url = tcp.url(redis_url)
        with (
            RPCServer(url, registry=registry, queue=queue_name).running(),
            RPCProxy(url, queue=queue_name, timeout=5) as proxy,
        ):
            assert proxy.fib(5) == 5
            tcp.sever()
            assert _first_answer(proxy) == 8, "no call answered 30 s after the cut"
    # The cut may have lost the server's ack of fib(5), which then runs and replies again:
    # the closed proxy's reply list waits for that with a time to live, not deleted (a
    # reply would make it again, for ever)
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.pttl(proxy.reply_queue) > 0
        assert client.lindex(proxy.reply_queue, -1) == TOMBSTONE
    finally:
        client.delete(proxy.reply_queue)
        client.close()


def test_redis_serves_again_after_a_cut_during_an_ack(
    redis_url: str,
    registry: Registry,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The cut comes while the server acks a request: the ack fails on the channel's
    # command connection, while its BRPOP connection has not yet seen the cut; closing
    # the channel then fails on that connection too.
    armed, cut = threading.Event(), threading.Event()
    ack = kombu_redis.QoS.ack
    tcp = TCPProxy.for_url(redis_url)

    def ack_across_the_cut(self: Any, delivery_tag: Any) -> None:
        if armed.is_set() and not cut.is_set():
            tcp.sever()
            cut.set()
            raise redis.exceptions.ConnectionError("the connection was cut during the ack")
        ack(self, delivery_tag)

    monkeypatch.setattr(kombu_redis.QoS, "ack", ack_across_the_cut)
    caplog.set_level(logging.WARNING, logger="kombu.transport.virtual.base")
    with tcp:
        url = tcp.url(redis_url)
        with (
            RPCServer(url, registry=registry, queue=queue_name).running(),
            RPCProxy(url, queue=queue_name, timeout=5) as proxy,
        ):
            assert proxy.fib(5) == 5
            armed.set()
            with contextlib.suppress(ConnectionLostError, RPCTimeout):
                proxy.fib(4)  # its ack is cut
            assert cut.wait(10)
            assert _first_answer(proxy) == 8, "no call answered 30 s after the cut"
    assert "No consumers" not in caplog.text


def _first_answer(proxy: RPCProxy) -> int | None:
    """The first answer of ``fib(6)``, called until one comes, for 30 s at most (calls
    in flight at the cut may be lost, or time out)."""
    deadline = monotonic() + 30
    while monotonic() < deadline:
        try:
            return int(proxy.fib(6))
        except (ConnectionLostError, RPCTimeout):
            sleep(0.1)
    return None
