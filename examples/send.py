"""Counterpart of the RabbitMQ tutorial 1 ``send.py``: sends "Hello World!" to the queue ``hello``.

The message goes out as the tutorial's does, as bare text (the ``Plain`` codec), so
the tutorial's own pika ``receive.py`` gets it too. The queue is declared by
``receive.py``: start it first.
"""

import argparse
import os
import sys

from kombu_rpc import NoServerError, Plain, RPCProxy

BROKER = os.environ.get("KOMBU_RPC_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--broker", default=BROKER)
parser.add_argument("--queue", default="hello")
args = parser.parse_args()

with RPCProxy(args.broker, queue=args.queue, codec=Plain()) as proxy:
    try:
        proxy.hello.cast("Hello World!")  # no reply; returns once the broker took it
    except NoServerError:
        sys.exit(f"No queue {args.queue!r} on the broker yet: start examples/receive.py first.")
print(" [x] Sent 'Hello World!'")
