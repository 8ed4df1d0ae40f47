"""Counterpart of the RabbitMQ tutorial 2 ``new_task.py``: sends one task to ``task_queue``.

The message is the command line (default "Hello World!"); each dot is a second of work.
Messages are persistent and the queue (declared by ``worker.py``) is durable.
"""

import argparse
import os
import sys

from kombu_rpc import NoServerError, RPCProxy

BROKER = os.environ.get("KOMBU_RPC_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("message", nargs="*")
parser.add_argument("--broker", default=BROKER)
parser.add_argument("--queue", default="task_queue")
args = parser.parse_args()
message = " ".join(args.message) or "Hello World!"

with RPCProxy(args.broker, queue=args.queue) as proxy:
    try:
        proxy.work.cast(message)  # returns once the broker took it
    except NoServerError:
        sys.exit(f"No queue {args.queue!r} on the broker yet: start a worker first (examples/worker.py).")
print(f" [x] Sent {message}")
