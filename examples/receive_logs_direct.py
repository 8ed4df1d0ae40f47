"""Counterpart of the RabbitMQ tutorial 4 ``receive_logs_direct.py``: prints lines by severity.

``python examples/receive_logs_direct.py warning error`` gets the lines that
``emit_log_direct.py`` publishes with severity "warning" or "error" to the direct
exchange ``direct_logs``. Ctrl+C (or SIGTERM) stops it.
"""

import argparse
import logging
import os
import sys

from kombu_rpc import Event, RPCServer, subscribe

BROKER = os.environ.get("KOMBU_RPC_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("severity", nargs="*")
parser.add_argument("--broker", default=BROKER)
parser.add_argument("--exchange", default="direct_logs")
parser.add_argument(
    "--queue", default="receive_logs_direct", help="the server's request queue (it serves no call here)"
)
args = parser.parse_args()
if not args.severity:
    sys.exit(f"Usage: {sys.argv[0]} [info] [warning] [error]")


@subscribe(args.exchange, args.severity, type="direct")  # one queue, bound with each severity
def callback(event: Event) -> None:
    print(f" [x] {event.routing_key!r}:{event.payload!r}")


logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")  # "... consuming" when ready
print(" [*] Waiting for logs. To exit press CTRL+C")
RPCServer(args.broker, queue=args.queue, concurrency=1).run()
