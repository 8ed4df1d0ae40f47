"""Counterpart of the RabbitMQ tutorial 3 ``receive_logs.py``: prints every line of ``logs``.

Each running copy has a queue of its own (exclusive, gone with it), so each gets every
line published meanwhile. Ctrl+C (or SIGTERM) stops it.
"""

import argparse
import logging
import os

from kombu_rpc import Event, RPCServer, subscribe

BROKER = os.environ.get("KOMBU_RPC_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--broker", default=BROKER)
parser.add_argument("--exchange", default="logs")
parser.add_argument(
    "--queue", default="receive_logs", help="the server's request queue (it serves no call here)"
)
args = parser.parse_args()


@subscribe(args.exchange, type="fanout")  # no group: every receiver gets each line
def callback(event: Event) -> None:
    print(f" [x] {event.payload!r}")


logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")  # "... consuming" when ready
print(" [*] Waiting for logs. To exit press CTRL+C")
RPCServer(args.broker, queue=args.queue, concurrency=1).run()
