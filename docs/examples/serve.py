"""A server in its own process: ``python serve.py [BROKER_URL]``; stop it with Ctrl-C."""

import logging
import sys

from kombu_rpc import RPCServer, remote


@remote
def fib(n: int) -> int:
    """The n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    broker = sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@localhost//"
    # Serves until SIGINT or SIGTERM, then finishes the calls in flight and returns.
    RPCServer(broker, queue="rpc_queue").run()
