"""Events without a broker: the publisher's and subscriptions' argument checks, the
names of event queues, decoding and handling an event."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from kombu_rpc import ConfigurationError, Event, EventPublisher, Registry, SerializationError
from kombu_rpc.events import Subscription, check_routing_key, decode_event, handle_event
from kombu_rpc.topology import (
    EVENT_EXCHANGE_TYPES,
    event_exchange,
    event_queue,
    event_queue_name,
)

pytestmark = pytest.mark.timeout(30)


def handler(event: Event) -> None:
    pass


@pytest.mark.parametrize("type", ["headers", "Topic", "", None])
def test_an_unknown_exchange_type_is_refused(type: Any) -> None:
    with pytest.raises(ConfigurationError, match="unknown exchange type"):
        EventPublisher("memory://", "logs", type)
    with pytest.raises(ConfigurationError, match="unknown exchange type"):
        Registry().subscribe("logs", type=type)(handler)


@pytest.mark.parametrize("exchange", ["", "has space", "amq.topic", "x" * 201, 3, None])
def test_an_invalid_exchange_name_is_refused(exchange: Any) -> None:
    with pytest.raises(ConfigurationError, match="exchange name"):
        EventPublisher("memory://", exchange)
    with pytest.raises(ConfigurationError, match="exchange name"):
        Registry().subscribe(exchange)(handler)


@pytest.mark.parametrize("key", ["kern.*", "kern.#", "#", "a b", 7, "x" * 256])
def test_a_routing_key_with_wildcards_or_spaces_is_refused_on_publish(key: Any) -> None:
    with EventPublisher("memory://", "logs") as publisher, pytest.raises(ConfigurationError):
        publisher.publish(key, {})


def test_a_payload_json_cannot_write_is_a_serialization_error() -> None:
    with EventPublisher("memory://", "logs") as publisher:
        for payload in ({1, 2}, object(), float("nan")):
            with pytest.raises(SerializationError, match="JSON"):
                publisher.publish("kern.info", payload)


@pytest.mark.parametrize("payload", [1, b"bytes", None, {"a": 1}, "\ud800"])
def test_a_plain_publisher_refuses_what_is_not_utf8_text(payload: Any) -> None:
    with EventPublisher("memory://", "logs", "topic", plain=True) as events:
        with pytest.raises(SerializationError, match=r"str payloads|UTF-8"):
            events.publish("a", payload)


def test_a_closed_publisher_refuses_to_publish() -> None:
    publisher = EventPublisher("memory://", "logs")
    publisher.close()
    with pytest.raises(ConfigurationError, match="closed"):
        publisher.publish("kern.info", 1)


def test_fanout_publishes_with_an_empty_key() -> None:
    assert check_routing_key("anything", "fanout") == ""
    assert check_routing_key("kern.info", "topic") == "kern.info"


def test_subscription_checks() -> None:
    registry = Registry()
    with pytest.raises(ConfigurationError, match="topic exchanges only"):
        registry.subscribe("logs", "kern.*", type="direct")(handler)
    with pytest.raises(ConfigurationError, match="group"):
        registry.subscribe("logs", group="two words")(handler)
    with pytest.raises(ConfigurationError, match="callable"):
        registry.subscribe("logs")(42)  # type: ignore[type-var]
    with pytest.raises(ConfigurationError, match="longer than"):
        registry.subscribe("logs", name="x" * 250)(handler)
    assert registry.subscriptions() == []


def test_subscribing_keeps_the_function_and_one_function_per_name() -> None:
    registry = Registry()
    assert registry.subscribe("logs", "kern.*")(handler) is handler
    registry.subscribe("logs", "kern.*")(handler)  # again: replaced
    [subscription] = registry.subscriptions()
    assert subscription == Subscription("logs", "topic", ("kern.*",), None, f"{__name__}.handler", handler)

    def other(event: Event) -> None:
        pass

    with pytest.raises(ConfigurationError, match="already subscribed"):
        registry.subscribe("logs", name=subscription.name)(other)
    registry.subscribe("logs", name=subscription.name, group="g")(other)  # another queue
    assert len(registry.subscriptions()) == 2


def test_event_topology_names() -> None:
    assert EVENT_EXCHANGE_TYPES == ("fanout", "direct", "topic")
    exchange = event_exchange("logs", "topic")
    assert (exchange.name, exchange.type, exchange.durable, exchange.auto_delete) == (
        "logs",
        "topic",
        True,
        False,
    )
    assert event_queue_name("logs", "app.h", None, "s1") == "kombu_rpc.events.logs.app.h.s1"
    assert event_queue_name("logs", "app.h", "g", "s1") == "kombu_rpc.events.logs.g.app.h"
    own = event_queue("logs", "topic", ("kern.*", "*.critical"), "app.h", None, "s1")
    assert (own.durable, own.exclusive, own.auto_delete) == (False, True, True)
    assert {(b.exchange.name, b.routing_key) for b in own.bindings} == {
        ("logs", "kern.*"),
        ("logs", "*.critical"),
    }
    shared = event_queue("logs", "direct", ("error",), "app.h", "g", "s1")
    assert (shared.durable, shared.exclusive, shared.auto_delete) == (True, False, False)
    [bound] = shared.bindings
    assert (bound.exchange.name, bound.exchange.type, bound.routing_key) == ("logs", "direct", "error")
    [fanout] = event_queue("logs", "fanout", ("#",), "app.h", None, "s1").bindings
    assert fanout.routing_key == ""


def test_several_binding_keys() -> None:
    registry = Registry()
    registry.subscribe("logs", ["kern.*", "*.critical", "kern.*"])(handler)
    [subscription] = registry.subscriptions()
    assert subscription.binding_keys == ("kern.*", "*.critical")  # once each, in order
    with pytest.raises(ConfigurationError, match="at least one binding key"):
        registry.subscribe("logs", [], name="none")(handler)
    with pytest.raises(ConfigurationError, match="topic exchanges only"):
        registry.subscribe("logs", ["error", "kern.*"], type="direct", name="bad")(handler)


def test_decoding_an_event() -> None:
    assert decode_event("logs", "a", "application/json", b'{"x": 1}') == Event("logs", "a", {"x": 1})
    assert decode_event("logs", "a", "application/json", '"text"').payload == "text"
    for content_type, body in [
        ("application/xml", b"<a/>"),
        ("application/json", b"{"),
        ("application/json", b"\xff"),
        ("text/plain", b"\xff"),
        (None, b"\xff"),
    ]:
        with pytest.raises(SerializationError):
            decode_event("logs", "a", content_type, body)


def test_a_text_event_or_one_without_content_type_is_a_str() -> None:
    # the tutorials' pika programs publish bare text, without a content type
    assert decode_event("logs", "a", None, b"info: Hello World!") == Event("logs", "a", "info: Hello World!")
    assert decode_event("logs", "a", "", "caf\u00e9").payload == "caf\u00e9"
    assert decode_event("logs", "a", "text/plain", b"1").payload == "1"  # not JSON-decoded
    assert decode_event("logs", "a", "Text/Plain; charset=utf-8", "caf\u00e9".encode()).payload == "caf\u00e9"


def test_a_failing_handler_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    def fails(event: Event) -> None:
        raise RuntimeError("broken handler")

    subscription = Subscription.of(fails, "logs", "#", "topic", None, "fails")
    with caplog.at_level(logging.ERROR, "kombu_rpc.events"):
        assert handle_event(subscription, Event("logs", "a", 1), asyncio.run) is False
    [record] = caplog.records
    assert record.levelname == "ERROR" and record.exc_info is not None
    assert handle_event(
        Subscription.of(handler, "logs", "#", "topic", None, "ok"), Event("logs", "a", 1), asyncio.run
    )


def test_an_async_handler_runs_its_coroutine_with_the_runner_given() -> None:
    seen: list[Any] = []

    async def handler(event: Event) -> None:
        seen.append(event.payload)
        if event.payload == "bad":
            raise ValueError("no")

    subscription = Subscription.of(handler, "logs", "#", "topic", None, "async")
    assert handle_event(subscription, Event("logs", "a", 1), asyncio.run)
    assert not handle_event(subscription, Event("logs", "a", "bad"), asyncio.run)
    assert seen == [1, "bad"]
