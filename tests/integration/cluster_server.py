"""An RPCServer in a process of its own on a RabbitMQ cluster, for
tests/integration/test_cluster.py.

Usage: ``python cluster_server.py URL QUEUE KIND``, where ``URL`` is the cluster's
failover URL (``amqp://...:P1//;amqp://...:P2//;...``) and ``KIND`` is ``quorum`` (a
durable quorum request queue) or ``classic`` (kombu_rpc's default request queue). It
serves ``echo(value)``, which returns its argument, with ``concurrency=4``.

It logs to stderr with millisecond timestamps; each line ``server <id> consuming
'<queue>' ...`` says it is ready, at its start and after each reconnection. It stops
gracefully on SIGTERM or SIGINT, and also when its standard input closes, so it does not
outlive a test run that was killed. It exits 0 after such a stop; if ``run()`` raises,
it logs the traceback and exits 3, so that the test tells the server giving up from any
other death.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from kombu_rpc import Registry, RPCServer

CONCURRENCY = 4
#: Exit status of a server whose ``run()`` raised.
GAVE_UP = 3


def make_registry() -> Registry:
    reg = Registry()

    @reg.remote
    def echo(value: Any) -> Any:
        return value

    return reg


def make_server(url: str, queue: str, kind: str) -> RPCServer:
    if kind not in ("quorum", "classic"):
        raise SystemExit(f"unknown queue kind {kind!r}: quorum or classic")
    return RPCServer(url, registry=make_registry(), queue=queue, queue_type=kind, concurrency=CONCURRENCY)


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    server = make_server(argv[1], argv[2], argv[3])

    def stop_when_orphaned() -> None:
        sys.stdin.read()  # EOF: the test process closed the pipe, or died
        server.stop()

    threading.Thread(target=stop_when_orphaned, daemon=True).start()
    try:
        server.run()
    except Exception:
        logging.getLogger("cluster_server").exception("run() raised: the server gave up")
        return GAVE_UP
    print("stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
