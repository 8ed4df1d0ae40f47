"""The proxies and the server take the same options wherever they are offered."""

from __future__ import annotations

import inspect

import pytest

from kombu_rpc import AsyncRPCProxy, RPCProxy

pytestmark = pytest.mark.timeout(10)


def parameters(function: object) -> list[tuple[str, object]]:
    return [
        (p.name, p.default)
        for p in inspect.signature(function).parameters.values()  # type: ignore[arg-type]
        if p.name != "self"
    ]


def test_the_async_proxy_takes_every_option_of_the_proxy() -> None:
    assert parameters(AsyncRPCProxy.__init__) == parameters(RPCProxy.__init__)


def test_the_async_proxy_views_take_every_option_of_the_proxy_views() -> None:
    assert [name for name, _ in parameters(AsyncRPCProxy.options)] == [
        name for name, _ in parameters(RPCProxy.options)
    ]


def test_every_option_of_a_proxy_is_checked_when_it_is_made() -> None:
    from kombu_rpc import ConfigurationError

    with pytest.raises(ConfigurationError, match="retry"):
        RPCProxy("memory://", retry="yes")  # type: ignore[arg-type]
    with RPCProxy("memory://") as proxy, pytest.raises(ConfigurationError, match="retry"):
        proxy.options(retry=1)  # type: ignore[arg-type]


def test_the_proxy_options_are_the_proxy_arguments() -> None:
    import dataclasses

    from kombu_rpc.options import ProxyOptions

    fields = [(f.name, f.default) for f in dataclasses.fields(ProxyOptions)]
    assert fields == [(name, default) for name, default in parameters(RPCProxy.__init__) if name != "broker"]


def test_the_server_options_are_the_server_arguments() -> None:
    import dataclasses

    from kombu_rpc import RPCServer
    from kombu_rpc.options import ServerOptions

    fields = [(f.name, f.default) for f in dataclasses.fields(ServerOptions)]
    assert fields == [(name, default) for name, default in parameters(RPCServer.__init__) if name != "broker"]


def test_options_are_checked_again_when_replaced() -> None:
    import dataclasses

    from kombu_rpc import ConfigurationError
    from kombu_rpc.options import ProxyOptions, ServerOptions

    options = ProxyOptions(timeout=2, secret="s" * 16, retry_policy={"max_retries": 1})
    assert options.timeout == 2.0 and options.secret == b"s" * 16
    assert dataclasses.replace(options, retry=True) == dataclasses.replace(options, retry=True)
    assert "s" * 16 not in repr(options)
    with pytest.raises(ConfigurationError, match="timeout must be a positive number"):
        dataclasses.replace(options, timeout=0)
    server = ServerOptions(queue_arguments={"x-queue-type": "quorum"}, accept=["json"])
    assert server.queue_type == "quorum" and server.durable and server.accept == frozenset({"json"})
    assert dataclasses.replace(server) == server
    with pytest.raises(ConfigurationError, match="queue_type must be one of"):
        dataclasses.replace(server, queue_type="stream")
