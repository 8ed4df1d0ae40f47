"""An RPCServer in a process of its own, for tests/integration/test_transports.py.

Usage: ``python transport_server.py BROKER_JSON QUEUE``, where ``BROKER_JSON`` is
``{"url": ..., "transport_options": {...}, "transport": "module:Class" or null}``: the
server builds its own :class:`kombu.Connection` from it, as a URL cannot carry transport
options (the filesystem transport's folders).

Optional keys of ``BROKER_JSON``: ``"events"``, an exchange whose ``news.#`` events the
server handles (each logged as ``event <payload>``); ``"lease_ttl"``, the seconds a
Redis server's lease on its own queues lasts (:mod:`kombu_rpc._transports.leases`).

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

from kombu_rpc import Event, Registry, RPCServer


def make_registry(events: str | None = None) -> Registry:
    reg = Registry()

    if events is not None:

        @reg.subscribe(events, "news.#")
        def news(event: Event) -> None:
            logging.getLogger("test.events").info("event %s", event.payload)

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
    if spec.get("lease_ttl") is not None:
        from kombu_rpc._transports import leases

        leases.LEASE_TTL = float(spec["lease_ttl"])
        leases.RENEW_EVERY = leases.LEASE_TTL / 4
    server = RPCServer(broker, registry=make_registry(spec.get("events")), queue=argv[2], concurrency=8)

    def stop_when_orphaned() -> None:
        sys.stdin.read()  # EOF: the test process closed the pipe, or died
        server.stop()

    threading.Thread(target=stop_when_orphaned, daemon=True).start()
    server.run()
    print("stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv)
