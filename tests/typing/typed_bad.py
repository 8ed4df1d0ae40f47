"""A sample that must NOT type-check: each line marked with E and an error code is an error mypy
must report, with that code (tests/unit/test_typed_mypy.py)."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

from kombu_rpc import AsyncRPCProxy, RPCProxy, call_async, call_map


class Math(Protocol):
    def add(self, a: int, b: int) -> int: ...


class AsyncMath(Protocol):
    async def add(self, a: int, b: int) -> int: ...


def use(proxy: RPCProxy) -> None:
    math = proxy.typed(Math)
    math.add(1, "2")  # E: arg-type
    math.add(1)  # E: call-arg
    text: str = math.add(1, 2)  # E: assignment
    math.sub(1, 2)  # E: attr-defined
    future: Future[str] = call_async(math.add, 1, 2)  # E: arg-type
    call_async(math.add, 1, "2")  # E: arg-type
    call_map(math.add, [1], ["2"])  # E: arg-type
    names: list[str] = list(call_map(math.add, [1], [2]))  # E: arg-type
    print(text, future, names)


async def use_async(proxy: AsyncRPCProxy) -> None:
    math = proxy.typed(AsyncMath)
    total: int = math.add(1, 2)  # E: assignment
    text: str = await math.add(1, 2)  # E: assignment
    print(total, text)
