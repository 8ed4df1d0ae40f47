"""Counterpart of the RabbitMQ tutorial 3 ``emit_log.py``: publishes to the fanout exchange ``logs``.

The line is the command line (default "info: Hello World!"), sent as bare text
(``plain=True``) like the tutorial's, so its own pika ``receive_logs.py`` gets it too.
Every ``receive_logs.py`` running gets it; with none running, it is lost.
"""

import argparse
import os

from kombu_rpc import EventPublisher

BROKER = os.environ.get("KOMBU_RPC_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("message", nargs="*")
parser.add_argument("--broker", default=BROKER)
parser.add_argument("--exchange", default="logs")
args = parser.parse_args()
message = " ".join(args.message) or "info: Hello World!"

with EventPublisher(args.broker, exchange=args.exchange, type="fanout", plain=True) as logs:
    logs.publish("", message)  # a fanout exchange ignores the routing key
print(f" [x] Sent {message!r}")
