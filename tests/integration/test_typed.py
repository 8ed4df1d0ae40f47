"""Typed proxies (``proxy.typed(Interface)``) and interface checks, on every broker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

import pytest

from kombu_rpc import (
    AsyncRPCProxy,
    ConfigurationError,
    RemoteError,
    RPCProxy,
    RPCServer,
    call_async,
    call_map,
)

pytestmark = pytest.mark.timeout(30)

Serve = Callable[..., RPCServer]
MakeProxy = Callable[..., RPCProxy]


class Service(Protocol):
    def fib(self, n: int) -> int: ...
    def echo(self, value: Any) -> Any: ...
    def boom(self, message: str = ...) -> None: ...


class Math(Protocol):
    def add(self, a: Any, b: Any) -> Any: ...


class AsyncService(Protocol):
    async def fib(self, n: int) -> int: ...


def test_a_typed_proxy_calls_the_remote_functions(serve: Serve, proxies: MakeProxy) -> None:
    serve()
    service = proxies().typed(Service)
    assert service.fib(30) == 832040
    assert call_async(service.fib, 10).result(10) == 55
    assert list(call_map(service.fib, range(8), window=3)) == [0, 1, 1, 2, 3, 5, 8, 13]
    assert list(call_map(proxies().typed(Math, prefix="math").add, "ab", "xy")) == ["ax", "by"]
    with pytest.raises(RemoteError, match="bad n"):
        service.boom()
    # the proxy's prefix reaches dotted names
    assert proxies().typed(Math, prefix="math").add(1, 2) == 3


def test_a_typed_async_proxy_calls_the_remote_functions(
    serve: Serve, broker_url: str, queue_name: str
) -> None:
    serve()

    async def main() -> int:
        async with AsyncRPCProxy(broker_url, queue=queue_name, timeout=10) as proxy:
            return await proxy.typed(AsyncService).fib(30)

    assert asyncio.run(main()) == 832040


def test_check_interface_accepts_what_the_server_serves(serve: Serve, proxies: MakeProxy) -> None:
    serve()
    proxy = proxies()
    proxy.check_interface(Service)
    proxy.check_interface(Math, prefix="math")


def test_check_interface_lists_every_difference(serve: Serve, proxies: MakeProxy) -> None:
    class Drifted(Protocol):
        def fib(self, count: int) -> int: ...  # renamed parameter
        def echo(self, value: Any, *, twice: bool = False) -> Any: ...  # an extra one
        def boom(self, message: str) -> None: ...  # lost its default
        def missing(self) -> None: ...

    serve()
    with pytest.raises(ConfigurationError) as info:
        proxies().check_interface(Drifted)
    message = str(info.value)
    assert "does not serve Drifted as declared" in message
    assert "fib: declared (count), served (n)" in message
    assert "echo: declared (value, *, twice=...), served (value)" in message
    assert "boom: declared (message), served (message=...)" in message
    assert "missing: not served" in message


def test_the_async_check_interface_reports_differences(
    serve: Serve, broker_url: str, queue_name: str
) -> None:
    class Drifted(Protocol):
        async def fib(self) -> int: ...

    serve()

    async def main() -> None:
        async with AsyncRPCProxy(broker_url, queue=queue_name, timeout=10) as proxy:
            await proxy.check_interface(AsyncService)
            with pytest.raises(ConfigurationError, match=r"fib: declared \(\), served \(n\)"):
                await proxy.check_interface(Drifted)

    asyncio.run(main())
