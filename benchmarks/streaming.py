"""Streaming throughput next to plain calls: ``python -m benchmarks.streaming``.

On each broker, one in-process :class:`~kombu_rpc.RPCServer` (``concurrency=1``, or
``--concurrency``) and one proxy. A measurement moves ``--items`` small values (the
integers 0 .. N-1) from the server to the caller three ways: one stream of N items
(``proxy.count.stream(N)``), one plain call of the same generator returning them as a
list (``proxy.count(N)``), and N plain calls ``proxy.echo(i)``, sequential then with 64
in flight (``call_async``).
Prints the median items/s of ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from kombu_rpc import Registry, RPCProxy, RPCServer

from .brokers import check_reachable, delete_queues, resolve_brokers, unique_queue
from .workload import echo

IN_FLIGHT = 64


def count(n: int) -> Iterator[int]:
    """The remote generator streamed: the integers 0 .. n-1."""
    yield from range(n)


def streamed(proxy: RPCProxy, items: int) -> float:
    """Items per second of one stream of ``items`` items."""
    started = time.perf_counter()
    received = sum(1 for _ in proxy.count.stream(items))
    assert received == items
    return items / (time.perf_counter() - started)


def as_list(proxy: RPCProxy, items: int) -> float:
    """Items per second of one plain call returning ``items`` items as a list."""
    started = time.perf_counter()
    assert len(proxy.count(items)) == items
    return items / (time.perf_counter() - started)


def sequential(proxy: RPCProxy, items: int) -> float:
    """Items per second of ``items`` blocking calls, one item each."""
    started = time.perf_counter()
    for i in range(items):
        proxy.echo(i)
    return items / (time.perf_counter() - started)


def pipelined(proxy: RPCProxy, items: int) -> float:
    """Items per second of ``items`` calls with :data:`IN_FLIGHT` in flight."""
    started = time.perf_counter()
    window: deque[Future[Any]] = deque()
    for i in range(items):
        if len(window) == IN_FLIGHT:
            window.popleft().result(60)
        window.append(proxy.echo.call_async(i))
    for future in window:
        future.result(60)
    return items / (time.perf_counter() - started)


WAYS: dict[str, Callable[[RPCProxy, int], float]] = {
    "one stream": streamed,
    "one call returning a list": as_list,
    "plain calls, sequential": sequential,
    f"plain calls, {IN_FLIGHT} in flight": pipelined,
}


def main(argv: list[str] | None = None) -> int:
    """Measure and print the comparison; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.streaming", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--broker", default="memory,amqp,redis", help="brokers (default memory,amqp,redis)")
    parser.add_argument("--items", type=int, default=10_000, help="items per measurement (default 10,000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--concurrency", type=int, default=1, help="the server's concurrency (default 1)")
    args = parser.parse_args(argv)
    registry = Registry()
    registry.remote(name="count")(count)
    registry.remote(name="echo")(echo)
    for broker in resolve_brokers(args.broker):
        reason = check_reachable(broker)
        if reason is not None:
            print(f"{broker.name}: skipped ({reason})")
            continue
        queue = unique_queue()
        results: dict[str, list[float]] = {}
        try:
            server = RPCServer(broker.url, registry=registry, queue=queue, concurrency=args.concurrency)
            with server.running(), RPCProxy(broker.url, queue=queue, timeout=120) as proxy:
                for way in WAYS.values():
                    way(proxy, 200)  # warm-up
                for _ in range(args.rounds):
                    for name, way in WAYS.items():
                        results.setdefault(name, []).append(way(proxy, args.items))
        finally:
            delete_queues(broker, [queue])
        rounds = f"medians of {args.rounds} rounds of {args.items:,} items"
        print(f"{broker.name}, concurrency={args.concurrency}: {rounds}")
        for name, values in results.items():
            print(f"  {name:<30} {statistics.median(values):9,.0f} items/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
