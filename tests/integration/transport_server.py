"""An RPCServer in a process of its own, for tests/integration/test_transports.py.

Usage: ``python transport_server.py BROKER_JSON QUEUE``, where ``BROKER_JSON`` is
``{"url": ..., "transport_options": {...}, "transport": "module:Class" or null}``: the
server builds its own :class:`kombu.Connection` from it, as a URL cannot carry transport
options (the filesystem transport's folders).

It logs to stderr; the line ``server <id> consuming '<queue>' ...`` says it is ready.
It stops gracefully on SIGTERM or SIGINT, and also when its standard input closes, so
it does not outlive a test run that was killed.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

from kombu import Connection
from kombu.utils.imports import symbol_by_name

from kombu_rpc import Registry, RPCServer


def make_registry() -> Registry:
    reg = Registry()

    @reg.remote
    def echo(value: Any) -> Any:
        return value

    @reg.remote
    def add(a: Any, b: Any) -> Any:
        return a + b

    @reg.remote
    def boom(message: str) -> None:
        raise ValueError(message)

    @reg.remote
    def sleep(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    return reg


def main(argv: list[str]) -> None:
    spec = json.loads(argv[1])
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    transport = spec.get("transport")
    broker = Connection(
        spec["url"],
        transport=symbol_by_name(transport) if transport else None,
        transport_options=spec.get("transport_options") or {},
    )
    server = RPCServer(broker, registry=make_registry(), queue=argv[2], concurrency=8)

    def stop_when_orphaned() -> None:
        sys.stdin.read()  # EOF: the test process closed the pipe, or died
        server.stop()

    threading.Thread(target=stop_when_orphaned, daemon=True).start()
    server.run()
    print("stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv)
