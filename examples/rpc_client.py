"""Counterpart of the RabbitMQ tutorial 6 ``rpc_client.py``: asks the server for ``fib(30)``.

Start ``python examples/rpc_server.py`` first, with the same ``--broker``.
"""

import argparse
import os

from kombu_rpc import RPCProxy

BROKER = os.environ.get("KOMBU_RPC_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--broker", default=BROKER)
parser.add_argument("--queue", default="rpc_queue")
args = parser.parse_args()

with RPCProxy(args.broker, queue=args.queue, timeout=30.0) as fibonacci_rpc:
    print(" [x] Requesting fib(30)")
    response = fibonacci_rpc.fib(30)
    print(f" [.] Got {response}")
