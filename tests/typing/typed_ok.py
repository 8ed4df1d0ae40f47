"""A sample that must type-check (mypy --strict): typed proxies as users write them."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Protocol

from kombu_rpc import AsyncRPCProxy, RPCProxy, call_async, call_map


class Math(Protocol):
    def add(self, a: int, b: int) -> int: ...
    def greet(self, name: str, *, loud: bool = False) -> str: ...


class AsyncMath(Protocol):
    async def add(self, a: int, b: int) -> int: ...


def use(proxy: RPCProxy) -> None:
    math = proxy.typed(Math)
    total: int = math.add(1, 2)
    text: str = math.greet("ada", loud=True)
    future: Future[int] = call_async(math.add, 1, 2)
    sums: list[int] = list(call_map(math.add, [1, 2], [3, 4], window=2))
    print(total, text, future, sums)


async def use_async(proxy: AsyncRPCProxy) -> None:
    math = proxy.typed(AsyncMath)
    total: int = await math.add(1, 2)
    both: tuple[int, int] = await asyncio.gather(math.add(1, 2), math.add(3, 4))
    print(total, both)
