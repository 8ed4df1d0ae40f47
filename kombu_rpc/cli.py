"""The ``kombu-rpc`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .errors import RPCError


def _demo(args: argparse.Namespace) -> int:
    from .proxy import RPCProxy
    from .registry import Registry
    from .server import RPCServer
    from .topology import new_id

    registry = Registry()

    @registry.remote
    def fib(n: int) -> int:
        """The n-th Fibonacci number."""
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a

    queue = f"kombu_rpc.demo.{new_id()}"
    with (
        RPCServer(args.broker, registry=registry, queue=queue).running(),
        RPCProxy(args.broker, queue=queue, timeout=10) as proxy,
    ):
        print(f"fib(30) = {proxy.fib(30)}")
        started = time.perf_counter()
        for _ in range(args.calls):
            proxy.fib(0)
        elapsed = time.perf_counter() - started
    print(f"{args.calls} sequential calls in {elapsed:.2f}s: {args.calls / elapsed:,.0f} calls/s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kombu-rpc``."""
    parser = argparse.ArgumentParser(prog="kombu-rpc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="serve fib in-process, call it, time 1,000 calls")
    demo.add_argument("--broker", default="memory://", help="broker URL (default: memory://)")
    demo.add_argument("--calls", type=int, default=1000, help="calls to time (default: 1000)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kombu-rpc`` with ``argv``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.handler(args)
    except RPCError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return status
