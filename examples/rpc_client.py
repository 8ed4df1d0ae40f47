"""Counterpart of the RabbitMQ tutorial 6 ``rpc_client.py``: asks the server for ``fib(30)``.

Start ``python examples/rpc_server.py`` first, with the same ``--broker`` (and
``--plain`` on both sides, or to call the tutorial's own pika ``rpc_server.py``).
"""

import argparse
import os
import sys

from kombu_rpc import NoServerError, Plain, RPCError, RPCProxy, RPCTimeout

BROKER = os.environ.get("KOMBU_RPC_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--broker", default=BROKER)
parser.add_argument("--queue", default="rpc_queue")
parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the reply (default 30)")
parser.add_argument("--plain", action="store_true", help="speak the tutorial's wire format (bare text)")
args = parser.parse_args()

try:
    with RPCProxy(
        args.broker, queue=args.queue, timeout=args.timeout, codec=Plain() if args.plain else None
    ) as fibonacci_rpc:
        print(" [x] Requesting fib(30)")
        response = fibonacci_rpc.fib(30)
        print(f" [.] Got {response}")
except NoServerError as exc:  # on RabbitMQ: no server ever declared the queue
    sys.exit(f"Error: {exc} Start examples/rpc_server.py first, with the same --broker and --queue.")
except RPCTimeout as exc:  # on Redis, a request waits for a server until the timeout
    sys.exit(f"Error: {exc}: is examples/rpc_server.py running, with the same --broker and --queue?")
except RPCError as exc:  # the broker is unreachable, or the call failed
    sys.exit(f"Error: {exc}")
