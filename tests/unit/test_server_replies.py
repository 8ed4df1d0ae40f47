"""The consuming thread's replies: published straight on its channel, they are the
message ``Producer.publish`` sends for the worker threads' replies."""

from __future__ import annotations

from typing import Any

import pytest
from kombu import Producer

from kombu_rpc import protocol
from kombu_rpc._replies import publish_on_channel
from kombu_rpc.connection import PUBLISH_TIMEOUT

pytestmark = pytest.mark.timeout(10)


class RecordingChannel:
    """Records what is asked of a channel; ``prepare_message`` returns its arguments."""

    def __init__(self) -> None:
        self.published: list[tuple[Any, dict[str, Any]]] = []

    def prepare_message(self, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        return (args, kwargs)

    def basic_publish(self, message: Any, **kwargs: Any) -> None:
        if kwargs.get("confirm_timeout", 0) is None:  # kombu >= 5.5 passes it on unset
            del kwargs["confirm_timeout"]
        self.published.append((message, kwargs))


@pytest.mark.parametrize(
    "encoded",
    [
        protocol.Encoded('{"result": 0}', "application/json", "utf-8"),
        protocol.Encoded("832040", "text/plain", ""),
        protocol.Encoded(b"\x80\x04K\x00.", "application/x-python-serialize", "binary"),
        protocol.Encoded(b"raw", "application/data", ""),
    ],
)
def test_a_reply_on_the_channel_is_what_producer_publish_sends(encoded: protocol.Encoded) -> None:
    address = protocol.ReplyAddress("reply-queue", "call-1")
    headers = {protocol.SERVER_ID_HEADER: "server-1"}
    direct, producer = RecordingChannel(), RecordingChannel()
    publish_on_channel(direct, address, encoded, dict(headers))
    Producer(producer, auto_declare=False).publish(
        body=encoded.payload,
        exchange="",
        routing_key=address.reply_to,
        correlation_id=address.correlation_id,
        headers=dict(headers),
        content_type=encoded.content_type,
        content_encoding=encoded.content_encoding,
        timeout=PUBLISH_TIMEOUT,  # py-amqp also bounds the wait for the confirm by it
    )
    assert direct.published == producer.published
    assert len(direct.published) == 1
