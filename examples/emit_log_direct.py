"""Counterpart of the RabbitMQ tutorial 4 ``emit_log_direct.py``: publishes a log line by severity.

``python examples/emit_log_direct.py error "Run. Run. Or it will explode."``: the
severity (default "info") is the routing key; the message (default "Hello World!") goes
as bare text, like the tutorial's. Only the receivers bound with that severity get it.
"""

import argparse
import os

from kombu_rpc import EventPublisher

BROKER = os.environ.get("KOMBU_RPC_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("severity", nargs="?", default="info")
parser.add_argument("message", nargs="*")
parser.add_argument("--broker", default=BROKER)
parser.add_argument("--exchange", default="direct_logs")
args = parser.parse_args()
message = " ".join(args.message) or "Hello World!"

with EventPublisher(args.broker, exchange=args.exchange, type="direct", plain=True) as logs:
    logs.publish(args.severity, message)
print(f" [x] Sent {args.severity!r}:{message!r}")
