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
