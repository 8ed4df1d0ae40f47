"""Broadcast: one request to every server of a queue, one reply per server."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kombu_rpc import BroadcastReply, ConfigurationError, RemoteError, RPCProxy, RPCServer

from ..conftest import Recorder

pytestmark = pytest.mark.timeout(60)


def test_a_broadcast_reaches_every_server_once(
    serve: Callable[..., RPCServer], proxies: Callable[..., RPCProxy], recorder: Recorder
) -> None:
    servers = [serve() for _ in range(3)]
    proxy = proxies()
    # When the caller pings the servers of its queue
    replies = proxy["kombu_rpc.ping"].broadcast(timeout=10, expect=3)
    # Then each of the three answers once, named by its own id
    assert sorted(r.server_id for r in replies) == sorted(s.server_id for s in servers)
    assert all(r.ok and r.get()["server_id"] == r.server_id for r in replies)
    # A user function runs once on each server
    replies = proxy.record.broadcast("reload", timeout=10, expect=3)
    assert [r.result for r in replies] == [None] * 3
    assert recorder.wait(3) == ["reload"] * 3
    # while an ordinary call still goes to one server only
    recorder.calls.clear()
    proxy.record("once")
    assert proxy.echo("sync") == "sync"  # the server is done with "once" by now (concurrency 1)
    assert recorder.calls == ["once"]


def test_without_expect_a_broadcast_gathers_for_the_whole_window(
    serve: Callable[..., RPCServer], proxies: Callable[..., RPCProxy]
) -> None:
    servers = {serve().server_id for _ in range(2)}
    replies = proxies().echo.broadcast(7, timeout=1.5)
    assert {r.server_id for r in replies} == servers
    assert [r.result for r in replies] == [7, 7]


def test_each_server_failure_is_its_own_reply(
    serve: Callable[..., RPCServer], proxies: Callable[..., RPCProxy]
) -> None:
    serve()
    serve()
    replies = proxies().boom.broadcast("broken", timeout=10, expect=2)
    assert len(replies) == 2
    for reply in replies:
        assert not reply.ok and isinstance(reply.error, RemoteError)
        assert reply.error.exc_message == "broken"
        with pytest.raises(RemoteError, match="broken"):
            reply.get()


def test_a_broadcast_with_no_server_is_empty(broker_url: str, proxies: Callable[..., RPCProxy]) -> None:
    # fails fast on AMQP and memory:// (no exchange, as no server declared it), after
    # the window elsewhere; and it declares no exchange that would stay (test_leftovers)
    proxy = proxies()
    assert proxy["kombu_rpc.ping"].broadcast(timeout=0.5) == []


def test_a_stopped_server_no_longer_gets_broadcasts(
    broker_url: str,
    registry: object,
    queue_name: str,
    serve: Callable[..., RPCServer],
    proxies: Callable[..., RPCProxy],
) -> None:
    staying = serve()
    leaving = RPCServer(broker_url, registry=registry, queue=queue_name)  # type: ignore[arg-type]
    proxy = proxies()
    with leaving.running():
        assert len(proxy["kombu_rpc.ping"].broadcast(timeout=10, expect=2)) == 2
    replies = proxy["kombu_rpc.ping"].broadcast(timeout=1)
    assert [r.server_id for r in replies] == [staying.server_id]


@pytest.mark.parametrize(
    ("options", "match"),
    [({"timeout": None}, "needs a timeout"), ({"timeout": 0}, "timeout"), ({"expect": 0}, "expect")],
)
def test_broadcast_options_are_checked(options: dict[str, object], match: str) -> None:
    with RPCProxy("memory://") as proxy, pytest.raises(ConfigurationError, match=match):
        proxy.echo.broadcast(1, **options)  # type: ignore[arg-type]


def test_a_broadcast_reply_is_a_value() -> None:
    assert BroadcastReply("s1", 5).get() == 5
    assert BroadcastReply("s1", 5) == BroadcastReply("s1", 5)


def test_the_async_proxy_broadcasts_too(
    serve: Callable[..., RPCServer], broker_url: str, queue_name: str
) -> None:
    import asyncio

    from kombu_rpc import AsyncRPCProxy

    servers = {serve().server_id for _ in range(2)}

    async def main() -> list[BroadcastReply]:
        async with AsyncRPCProxy(broker_url, queue=queue_name, timeout=10) as proxy:
            replies, echoed = await asyncio.gather(
                proxy.echo.broadcast(3, timeout=10, expect=2), proxy.echo(4)
            )
            assert echoed == 4
            return replies

    replies = asyncio.run(main())
    assert {r.server_id for r in replies} == servers and [r.result for r in replies] == [3, 3]
