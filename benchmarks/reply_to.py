"""Direct reply-to against a declared reply queue on RabbitMQ: ``python -m benchmarks.reply_to``.

One in-process :class:`~kombu_rpc.RPCServer` (``concurrency=1``) and two proxies on its
queue, one with a declared reply queue (the default) and one with
``direct_reply_to=True``. In each round both proxies make ``--calls`` sequential
``fib(0)`` calls and then ``--calls`` calls with 64 in flight (``call_async``), in
alternating order; with and without publisher confirms. Prints the median calls/s of
each.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

from kombu_rpc import Registry, RPCProxy, RPCServer

from .brokers import delete_queues, resolve_brokers, unique_queue
from .workload import fib

IN_FLIGHT = 64


def sequential(proxy: RPCProxy, calls: int) -> float:
    """Calls per second of ``calls`` blocking calls."""
    started = time.perf_counter()
    for _ in range(calls):
        proxy.fib(0)
    return calls / (time.perf_counter() - started)


def pipelined(proxy: RPCProxy, calls: int) -> float:
    """Calls per second of ``calls`` calls with :data:`IN_FLIGHT` in flight."""
    started = time.perf_counter()
    window: deque[Future[Any]] = deque()
    for _ in range(calls):
        if len(window) == IN_FLIGHT:
            window.popleft().result(30)
        window.append(proxy.fib.call_async(0))
    for future in window:
        future.result(30)
    return calls / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    """Measure and print the comparison; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reply_to", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1500, help="calls per measurement (default 1,500)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    args = parser.parse_args(argv)
    (broker,) = resolve_brokers("amqp")
    registry = Registry()
    registry.remote(name="fib")(fib)
    for confirm in (True, False):
        queue = unique_queue()
        results: dict[str, list[float]] = {}
        try:
            server = RPCServer(broker.url, registry=registry, queue=queue, confirm_publish=confirm)
            with (
                server.running(),
                RPCProxy(broker.url, queue=queue, timeout=30, confirm_publish=confirm) as declared,
                RPCProxy(
                    broker.url, queue=queue, timeout=30, confirm_publish=confirm, direct_reply_to=True
                ) as direct,
            ):
                proxies = {"declared reply queue": declared, "direct reply-to": direct}
                for proxy in proxies.values():
                    sequential(proxy, 200)  # warm-up
                for round_no in range(args.rounds):
                    order = list(proxies) if round_no % 2 == 0 else list(proxies)[::-1]
                    for name in order:
                        results.setdefault(f"{name}, sequential", []).append(
                            sequential(proxies[name], args.calls)
                        )
                        results.setdefault(f"{name}, {IN_FLIGHT} in flight", []).append(
                            pipelined(proxies[name], args.calls)
                        )
        finally:
            delete_queues(broker, [queue])
        print(f"confirm_publish={confirm}, medians of {args.rounds} rounds of {args.calls:,} calls:")
        for name, values in sorted(results.items()):
            print(f"  {name:<40} {statistics.median(values):7,.0f} calls/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
