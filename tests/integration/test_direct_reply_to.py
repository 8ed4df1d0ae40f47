"""RabbitMQ direct reply-to: replies through ``amq.rabbitmq.reply-to``, no reply queue."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kombu_rpc import ConfigurationError, ConnectionLostError, RemoteError, RPCProxy, RPCServer, RPCTimeout
from kombu_rpc.topology import DIRECT_REPLY_TO

from ..conftest import Gate
from .tcpproxy import TCPProxy

pytestmark = pytest.mark.timeout(60)
#: Direct reply-to is a RabbitMQ feature: ``broker_url`` covers RabbitMQ only.
AMQP_ONLY = True


@pytest.fixture
def direct(broker_url: str, queue_name: str) -> Callable[..., RPCProxy]:
    made: list[RPCProxy] = []

    def make(**kwargs: object) -> RPCProxy:
        made.append(RPCProxy(broker_url, queue=queue_name, timeout=10, direct_reply_to=True, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make  # type: ignore[misc]
    for proxy in made:
        proxy.close()


def test_calls_futures_casts_and_errors(
    serve: Callable[..., RPCServer], direct: Callable[..., RPCProxy]
) -> None:
    serve(concurrency=4)
    proxy = direct()
    assert proxy.reply_queue == DIRECT_REPLY_TO
    assert proxy.math.add(2, 3) == 5
    futures = [proxy.echo.call_async(i) for i in range(500)]
    assert [f.result() for f in futures] == list(range(500))
    with pytest.raises(RemoteError, match="bad n"):
        proxy.boom()
    proxy.record.cast("cast")


def test_a_call_times_out_and_the_proxy_goes_on(
    serve: Callable[..., RPCServer], direct: Callable[..., RPCProxy], gate: Gate
) -> None:
    serve(concurrency=2)
    proxy = direct()
    with pytest.raises(RPCTimeout):
        proxy.options(timeout=0.3).held()
    gate.released.set()
    assert proxy.echo(1) == 1


def test_signed_calls_survive_the_reply_to_rewrite(
    serve: Callable[..., RPCServer], direct: Callable[..., RPCProxy]
) -> None:
    secret = "correct horse battery staple"
    serve(secret=secret)
    assert direct(secret=secret).echo("signed") == "signed"


def test_direct_reply_to_needs_rabbitmq() -> None:
    with pytest.raises(ConfigurationError, match="RabbitMQ"):
        RPCProxy("memory://", direct_reply_to=True)


@pytest.mark.faults
def test_after_a_lost_connection_new_calls_succeed(
    broker_url: str, serve: Callable[..., RPCServer], queue_name: str
) -> None:
    serve()
    with TCPProxy.for_url(broker_url) as tcp:
        proxy = RPCProxy(tcp.url(broker_url), queue=queue_name, timeout=5, direct_reply_to=True)
        with proxy:
            assert proxy.echo(1) == 1
            accepted = tcp.accepted
            tcp.sever()
            # a call may be lost with the channel (then it times out); later ones succeed
            outcomes = []
            for i in range(20):
                try:
                    outcomes.append(proxy.echo(i) == i)
                except (RPCTimeout, ConnectionLostError):
                    outcomes.append(False)
            assert all(outcomes[-10:]) and tcp.accepted > accepted
