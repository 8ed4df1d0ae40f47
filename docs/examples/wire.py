"""The wire format by hand: publish a request with plain kombu and read the reply."""

import time
import uuid

from kombu import Consumer, Producer, Queue

from kombu_rpc import Registry, RPCServer
from kombu_rpc.connection import connect

registry = Registry()


@registry.remote(name="math.add")
def add(a: int, b: int) -> int:
    return a + b


def main() -> None:
    server = RPCServer("memory://", registry=registry, queue="wire-demo")
    # connect() gives the event-driven memory transport that the server waits on.
    with server.running(), connect("memory://") as conn:
        reply_queue = Queue(f"my-replies-{uuid.uuid4().hex}", exclusive=True, auto_delete=True)
        replies = []

        def on_reply(body: dict, message: object) -> None:
            replies.append(body)

        with Consumer(conn, [reply_queue], callbacks=[on_reply], accept=["json"], no_ack=True):
            Producer(conn).publish(
                {"method": "math.add", "args": [2], "kwargs": {"b": 3}},
                exchange="",  # the default exchange routes by queue name
                routing_key="wire-demo",
                serializer="json",
                reply_to=reply_queue.name,
                correlation_id=uuid.uuid4().hex,
                headers={"x-rpc-deadline": time.time() + 10},
                expiration=10,
            )
            Producer(conn).publish(
                {"method": "math.add", "args": [2]},
                exchange="",
                routing_key="wire-demo",
                serializer="json",
                reply_to=reply_queue.name,
                correlation_id=uuid.uuid4().hex,
            )
            while len(replies) < 2:
                conn.drain_events(timeout=5)
    print(replies[0])  # {'result': 5}
    print(replies[1]["error"]["kind"], replies[1]["error"]["message"])
    # invalid_arguments math.add(): missing a required argument: 'b'


if __name__ == "__main__":
    main()
