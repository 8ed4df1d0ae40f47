"""Counterpart of the RabbitMQ tutorial 5 ``emit_log_topic.py``: publishes to ``topic_logs``.

``python examples/emit_log_topic.py kern.critical "A critical kernel error"``: the
routing key (default "anonymous.info") is words separated by dots, typically
"<facility>.<severity>"; the message (default "Hello World!") goes as bare text, like
the tutorial's.
"""

import argparse
import os

from kombu_rpc import EventPublisher

BROKER = os.environ.get("KOMBU_RPC_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("routing_key", nargs="?", default="anonymous.info")
parser.add_argument("message", nargs="*")
parser.add_argument("--broker", default=BROKER)
parser.add_argument("--exchange", default="topic_logs")
args = parser.parse_args()
message = " ".join(args.message) or "Hello World!"

with EventPublisher(args.broker, exchange=args.exchange, type="topic", plain=True) as logs:
    logs.publish(args.routing_key, message)
print(f" [x] Sent {args.routing_key!r}:{message!r}")
