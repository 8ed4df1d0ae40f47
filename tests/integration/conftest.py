"""Fixtures for the broker suites: a raw client that publishes hand-made requests, and
private broker nodes for the tests that cut or restart a broker."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from kombu import Connection, Producer, Queue

from kombu_rpc.connection import connect
from kombu_rpc.topology import new_id

from ..brokers import PrivateRabbit, PrivateRedis, start_private


class RawClient:
    """Publishes hand-made requests and reads the replies from a queue of its own."""

    def __init__(self, conn: Connection, queue: str) -> None:
        self.queue = queue
        self.reply_to = f"test.raw-replies.{new_id()}"
        self.replies = conn.SimpleQueue(Queue(self.reply_to, routing_key=self.reply_to), no_ack=True)
        self.producer = Producer(conn.clone())
        self.last_message: Any = None

    def send(
        self,
        body: Any,
        *,
        reply: bool = True,
        content_type: str = "application/json",
        properties: dict[str, Any] | None = None,
        headers: dict[str, Any] | None = None,
        compression: str | None = None,
    ) -> str:
        correlation_id = new_id()
        props: dict[str, Any] = {"reply_to": self.reply_to, "correlation_id": correlation_id} if reply else {}
        props.update(properties or {})
        self.producer.publish(
            body,
            exchange="",
            routing_key=self.queue,
            content_type=content_type,
            content_encoding="utf-8" if isinstance(body, str) else "binary",
            headers=headers or {},
            compression=compression,
            **props,
        )
        return correlation_id

    def reply(self, correlation_id: str) -> dict[str, Any]:
        message = self.last_message = self.replies.get(block=True, timeout=10)
        assert message.properties["correlation_id"] == correlation_id
        body: dict[str, Any] = message.decode()
        return body


@pytest.fixture
def raw(broker_url: str, queue_name: str) -> Iterator[RawClient]:
    with connect(broker_url) as conn:  # memory:// that wakes on put, like the library's
        client = RawClient(conn, queue_name)
        yield client
        client.replies.consumer.cancel()
        client.replies.queue.purge()
        client.replies.queue.delete()
        client.producer.connection.release()


# Private nodes: started at the first test that asks for one, shared by the run's tests,
# removed when the run ends (stop() also runs at exit, and a reaper process removes them
# if the run is killed). A run without such tests starts none.


@pytest.fixture(scope="session")
def private_rabbit() -> Iterator[PrivateRabbit]:
    """A RabbitMQ node of this run's own, on free loopback ports, which tests may cut
    and restart (never the shared one on 5672)."""
    node = start_private(PrivateRabbit)
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of this run's own, on a free loopback port, whose clients tests
    may kill (never the shared one on 6379)."""
    node = start_private(PrivateRedis)
    try:
        yield node
    finally:
        node.stop()


@contextmanager
def refusing_queue(amqp_url: str, name: str) -> Iterator[str]:
    """A RabbitMQ queue that refuses every message (the broker nacks what is published
    to it), deleted afterwards."""
    with Connection(amqp_url) as conn:
        queue = Queue(
            name, routing_key=name, queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )(conn.default_channel)
        queue.declare()
        try:
            yield name
        finally:
            queue.delete()
