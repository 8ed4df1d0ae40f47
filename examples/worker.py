"""Counterpart of the RabbitMQ tutorial 2 ``worker.py``: runs tasks from the durable ``task_queue``.

Each task "works" one second per dot in its message. ``concurrency=1`` means prefetch 1
(fair dispatch: a busy worker gets no new task) and the task is acked only once done, so
a worker killed mid-task loses nothing. Start several and send tasks with ``new_task.py``.
"""

import argparse
import logging
import os
import time

from kombu_rpc import RPCServer, remote


@remote
def work(message: str) -> None:
    print(f" [x] Received {message}")
    time.sleep(message.count("."))
    print(" [x] Done")


BROKER = os.environ.get("KOMBU_RPC_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--broker", default=BROKER)
parser.add_argument("--queue", default="task_queue")
args = parser.parse_args()

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")  # "... consuming" when ready
print(" [*] Waiting for messages. To exit press CTRL+C")
RPCServer(args.broker, queue=args.queue, concurrency=1, durable=True).run()
