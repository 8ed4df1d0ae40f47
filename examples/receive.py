"""Counterpart of the RabbitMQ tutorial 1 ``receive.py``: prints the messages of the queue ``hello``.

It reads bare text (the ``Plain`` codec), as the tutorial's ``send.py`` sends it, so
the tutorial's own pika ``send.py`` can talk to it. Ctrl+C (or SIGTERM) stops it.
"""

import argparse
import logging
import os

from kombu_rpc import Plain, RPCServer, remote


@remote
def hello(body: str) -> None:
    print(f" [x] Received {body!r}")


BROKER = os.environ.get("KOMBU_RPC_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--broker", default=BROKER)
parser.add_argument("--queue", default="hello")
args = parser.parse_args()

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")  # "... consuming" when ready
print(" [*] Waiting for messages. To exit press CTRL+C")
# Plain("hello", parse=str) runs hello for every message, with its body's text as it is.
RPCServer(args.broker, queue=args.queue, codec=Plain("hello", parse=str), concurrency=1).run()
