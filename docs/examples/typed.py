"""Typed calls: an interface the type checker holds remote calls to."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

from kombu_rpc import Registry, RPCProxy, RPCServer, call_async

registry = Registry()


@registry.remote
def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@registry.remote(name="math.add")
def add(a: float, b: float) -> float:
    return a + b


class Service(Protocol):
    """What the client expects of the server: the interface, not the implementation."""

    def fib(self, n: int) -> int: ...


class Math(Protocol):
    def add(self, a: float, b: float) -> float: ...


def main() -> None:
    with (
        RPCServer("memory://", registry=registry, queue="typed-demo").running(),
        RPCProxy("memory://", queue="typed-demo", timeout=5) as proxy,
    ):
        proxy.check_interface(Service)  # the server serves fib(n): no ConfigurationError
        service = proxy.typed(Service)
        result: int = service.fib(30)  # mypy: fib takes an int and returns an int
        future: Future[int] = call_async(service.fib, 10)  # mypy: a Future[int]
        math = proxy.typed(Math, prefix="math")  # math.add calls "math.add"
        print(result, future.result(), math.add(1.5, 2))


if __name__ == "__main__":
    main()
