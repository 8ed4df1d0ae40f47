"""The ``kombu-rpc`` command line: ``serve``, ``call``, ``describe`` and ``demo``.

The broker URL comes from ``--broker``, else the ``KOMBU_RPC_BROKER_URL`` environment
variable; only ``demo`` falls back to ``memory://``. User errors print one
``Error: ...`` line on stderr and exit with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .errors import ConfigurationError, RemoteError, RPCError
from .topology import DEFAULT_QUEUE

#: Environment variable holding the default broker URL.
BROKER_ENV = "KOMBU_RPC_BROKER_URL"


def _broker(args: argparse.Namespace, fallback: str | None = None) -> str:
    url = args.broker or os.environ.get(BROKER_ENV) or fallback
    if not url:
        raise ConfigurationError(
            f"a broker is needed: pass --broker URL or set {BROKER_ENV} "
            "(for example amqp://guest:guest@127.0.0.1//)"
        )
    return url


def _load_registry(target: str) -> Any:
    from .registry import Registry, default_registry

    module_name, _, attribute = target.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    if not attribute:
        return default_registry
    registry = getattr(module, attribute, None)
    if not isinstance(registry, Registry):
        raise ConfigurationError(f"{target!r} is not a kombu_rpc.Registry")
    return registry


def _serve(args: argparse.Namespace) -> int:
    from .connection import connect, safe_uri
    from .server import RPCServer

    broker = _broker(args)
    registry = _load_registry(args.module)
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = RPCServer(broker, registry=registry, queue=args.queue, concurrency=args.concurrency)
    print(f"kombu-rpc serving {args.module} on {safe_uri(connect(broker))}", flush=True)
    print(f"  queue: {args.queue}  concurrency: {args.concurrency}", flush=True)
    for name in registry.names():
        print(f"  - {name}", flush=True)
    server.run()
    return 0


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _call(args: argparse.Namespace) -> int:
    from .proxy import RPCProxy

    kwargs = json.loads(args.kwargs) if args.kwargs else {}
    if not isinstance(kwargs, dict):
        raise ConfigurationError("--kwargs must be a JSON object")
    with RPCProxy(_broker(args), queue=args.queue, timeout=args.timeout) as proxy:
        result = proxy[args.method](*[_parse_arg(a) for a in args.args], **kwargs)
    print(json.dumps(result))
    return 0


def _describe(args: argparse.Namespace) -> int:
    from .proxy import RPCProxy
    from .registry import RESERVED_PREFIX

    with RPCProxy(_broker(args), queue=args.queue, timeout=args.timeout) as proxy:
        methods = proxy[f"{RESERVED_PREFIX}describe"]()
    for method in methods:
        doc = f"  {method['doc']}" if method["doc"] else ""
        print(f"{method['name']}{method['signature']}{doc}")
    return 0


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

    broker = _broker(args, fallback="memory://")
    queue = f"kombu_rpc.demo.{new_id()}"
    with (
        RPCServer(broker, registry=registry, queue=queue).running(),
        RPCProxy(broker, queue=queue, timeout=10) as proxy,
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
    parser = argparse.ArgumentParser(prog="kombu-rpc", description="Remote procedure calls over kombu.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--broker", help=f"broker URL (default: ${BROKER_ENV})")
        return sub

    serve = command("serve", "serve the functions a module registers")
    serve.add_argument(
        "module",
        metavar="MODULE[:REGISTRY]",
        help="module to import; REGISTRY names a kombu_rpc.Registry in it (default: the default registry)",
    )
    serve.add_argument("--queue", default=DEFAULT_QUEUE, help=f"request queue (default: {DEFAULT_QUEUE})")
    serve.add_argument("--concurrency", type=int, default=1, help="calls run at once (default: 1)")
    serve.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(handler=_serve)

    call = command("call", "call a remote function and print its result as JSON")
    call.add_argument("method", help="remote name, e.g. math.add")
    call.add_argument("args", nargs="*", metavar="ARG", help="arguments, each parsed as JSON, else a string")
    call.add_argument("--kwargs", help="keyword arguments as a JSON object")

    describe = command("describe", "list the methods a running server exposes")
    for sub in (call, describe):
        sub.add_argument("--queue", default=DEFAULT_QUEUE, help=f"request queue (default: {DEFAULT_QUEUE})")
        sub.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default: 30)")
    call.set_defaults(handler=_call)
    describe.set_defaults(handler=_describe)

    demo = command("demo", "serve fib in-process, call it, time sequential calls (default: memory://)")
    demo.add_argument("--calls", type=int, default=1000, help="calls to time (default: 1000)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kombu-rpc`` with ``argv``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.handler(args)
    except RemoteError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except (RPCError, json.JSONDecodeError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return status
