"""Counterpart of the RabbitMQ tutorial 5 ``receive_logs_topic.py``: prints matching lines.

``python examples/receive_logs_topic.py "kern.*" "*.critical"``: in a binding key, ``*``
stands for one word and ``#`` for any number of them (``#`` alone: every line).
Ctrl+C (or SIGTERM) stops it.
"""

import argparse
import logging
import os
import sys

from kombu_rpc import Event, RPCServer, subscribe

BROKER = os.environ.get("KOMBU_RPC_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("binding_key", nargs="*")
parser.add_argument("--broker", default=BROKER)
parser.add_argument("--exchange", default="topic_logs")
parser.add_argument(
    "--queue", default="receive_logs_topic", help="the server's request queue (it serves no call here)"
)
args = parser.parse_args()
if not args.binding_key:
    sys.exit(f"Usage: {sys.argv[0]} [binding_key]...")


@subscribe(args.exchange, args.binding_key, type="topic")  # one queue, bound with each key
def callback(event: Event) -> None:
    print(f" [x] {event.routing_key!r}:{event.payload!r}")


logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")  # "... consuming" when ready
print(" [*] Waiting for logs. To exit press CTRL+C")
RPCServer(args.broker, queue=args.queue, concurrency=1).run()
