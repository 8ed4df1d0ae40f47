"""Counterpart of the RabbitMQ tutorial 6 ``rpc_server.py``: serves ``fib`` on ``rpc_queue``.

Run ``python examples/rpc_server.py`` (``--broker`` picks another broker), then call it
with ``python examples/rpc_client.py``. Ctrl+C (or SIGTERM) stops it gracefully.

With ``--plain`` it speaks the tutorial's own wire format (the ``Plain`` codec: the
argument and the result as bare text) instead of kombu_rpc's, so that the tutorial's
pika ``rpc_client.py`` can call it; ``rpc_client.py --plain`` calls it too.
"""

import argparse
import logging
import os

from kombu_rpc import Plain, RPCServer, remote


def fib(n: int) -> int:  # the tutorial's naive recursion: fib(30) takes a moment
    return n if n < 2 else fib(n - 1) + fib(n - 2)


@remote(name="fib")  # served as "fib"; prints once per request, not per recursion
def serve_fib(n: int) -> int:
    print(f" [.] fib({n})")
    return fib(n)


BROKER = os.environ.get("KOMBU_RPC_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--broker", default=BROKER)
parser.add_argument("--queue", default="rpc_queue")
parser.add_argument(
    "--plain",
    action="store_true",
    help="speak the tutorial's wire format (bare text), for the tutorial's pika client",
)
args = parser.parse_args()

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")  # "... consuming" when ready
print(" [x] Awaiting RPC requests")
# Plain("fib") runs fib for every request: the tutorial's requests name no function.
RPCServer(args.broker, queue=args.queue, codec=Plain("fib") if args.plain else None).run()
