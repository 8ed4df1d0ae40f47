"""The consuming thread's replies: published straight on its channel, they are the
message ``Producer.publish`` sends for the worker threads' replies; and what each
publish means for its request (ack, requeue, ack once the broker confirmed)."""

from __future__ import annotations

from typing import Any

import pytest
from kombu import Connection, Producer

from kombu_rpc import protocol
from kombu_rpc._replies import ReplyPublisher, Settlement, publish_on_channel
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


class ConfirmingChannel(RecordingChannel):
    """A recording channel that can be put in confirm mode."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.events: dict[str, set[Any]] = {"basic_ack": set(), "basic_nack": set()}
        self.confirming = False

    def confirm_select(self) -> None:
        self.confirming = True

    def basic_publish(self, message: Any, **kwargs: Any) -> None:
        if self.fail:
            raise OSError("connection reset")
        super().basic_publish(message, **kwargs)


class Request:
    """Records how a request was settled."""

    def __init__(self) -> None:
        self.settled: list[str] = []

    def ack(self) -> None:
        self.settled.append("ack")

    def requeue(self) -> None:
        self.settled.append("requeue")


REPLY = (
    protocol.ReplyAddress("reply-queue", "call-1"),
    protocol.Encoded('{"result": 0}', "application/json", "utf-8"),
    {protocol.SERVER_ID_HEADER: "server-1"},
)


def publisher_on(channel: ConfirmingChannel, confirming: bool) -> ReplyPublisher:
    publisher = ReplyPublisher(Connection("memory://"), {}, confirm_publish=confirming)
    publisher.start((ConnectionError,))
    publisher.bind(channel, confirming)
    return publisher


def test_without_confirms_a_published_reply_means_ack() -> None:
    channel, request = ConfirmingChannel(), Request()
    publisher = publisher_on(channel, confirming=False)
    settlement = publisher.publish_reply(REPLY)
    assert settlement is Settlement.ACK and len(channel.published) == 1
    publisher.settle(request, settlement)
    assert request.settled == ["ack"]


def test_with_confirms_the_ack_waits_for_the_brokers_confirm() -> None:
    channel, first, second = ConfirmingChannel(), Request(), Request()
    publisher = publisher_on(channel, confirming=True)
    assert channel.confirming
    for request in (first, second):
        settlement = publisher.publish_reply(REPLY)
        assert settlement is Settlement.ACK_AFTER_CONFIRM
        publisher.settle(request, settlement)
    assert first.settled == second.settled == []
    (on_ack,), (on_nack,) = channel.events["basic_ack"], channel.events["basic_nack"]
    on_ack(1, False)
    assert (first.settled, second.settled) == (["ack"], [])
    on_nack(2, False)  # the broker refused the second reply: its request goes back
    assert (first.settled, second.settled) == (["ack"], ["requeue"])
    assert publisher.unconfirmed == {}


def test_a_reply_that_could_not_be_published_means_requeue() -> None:
    channel, request = ConfirmingChannel(fail=True), Request()
    publisher = publisher_on(channel, confirming=True)
    settlement = publisher.publish_reply(REPLY)
    assert settlement is Settlement.REQUEUE
    publisher.settle(request, settlement)
    assert request.settled == ["requeue"] and publisher.unconfirmed == {}
