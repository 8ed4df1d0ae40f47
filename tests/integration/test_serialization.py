"""What a call carries, on memory:// and on every real broker: JSON values and kombu's
typed values (datetime, date, time, Decimal, UUID, bytes) come back exactly as they
were sent, mappings that look like typed values included; pickle, where a server opts
in, carries them untouched."""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from kombu.utils import json as kombu_json

from kombu_rpc import Registry, RemoteError, RPCProxy, RPCServer
from kombu_rpc.protocol import ESCAPE_KEY

from ..unit.test_codecs import LOOK_ALIKES, TYPED_VALUES, same
from .conftest import RawClient

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def typed_registry() -> Registry:
    reg = Registry()

    @reg.remote
    def echo(*args: Any, **kwargs: Any) -> Any:
        return {"args": list(args), "kwargs": kwargs}

    @reg.remote
    def types_of(*args: Any, **kwargs: Any) -> Any:
        """What the function received: each argument's type (and a mapping's keys)."""
        return [
            f"dict:{','.join(sorted(value))}" if isinstance(value, dict) else type(value).__name__
            for value in [*args, *kwargs.values()]
        ]

    @reg.remote
    def make(kind: str) -> Any:
        return {"datetime": datetime.datetime(2024, 2, 29, 12, 0, 1), "set": {1, 2}}[kind]

    return reg


def everything() -> dict[str, Any]:
    """One nested value holding every typed value and every look-alike."""
    values = [param.values[0] for param in TYPED_VALUES + LOOK_ALIKES]
    return {
        "flat": values,
        "deep": {"list": [values, {"again": values}]},
        "by_id": {str(i): value for i, value in enumerate(values)},
    }


@pytest.mark.parametrize("value", TYPED_VALUES + LOOK_ALIKES)
def test_an_argument_and_a_result_come_back_as_they_were_sent(
    serve: Callable[..., RPCServer], proxy: RPCProxy, typed_registry: Registry, value: Any
) -> None:
    serve(registry=typed_registry)
    reply = proxy.echo(value, [value], key=value, nested={"in": [value]})
    same(reply, {"args": [value, [value]], "kwargs": {"key": value, "nested": {"in": [value]}}})


def test_everything_at_once_nested(
    serve: Callable[..., RPCServer], proxy: RPCProxy, typed_registry: Registry
) -> None:
    serve(registry=typed_registry)
    value = everything()
    same(proxy.echo(value, value=value), {"args": [value], "kwargs": {"value": value}})


def test_the_function_receives_the_types_the_caller_sent(
    serve: Callable[..., RPCServer], proxy: RPCProxy, typed_registry: Registry
) -> None:
    serve(registry=typed_registry)
    sent = [datetime.datetime(2024, 1, 1), datetime.date(2024, 1, 1), datetime.time(1), Decimal("1.5")]
    assert proxy.types_of(*sent, u=uuid.uuid4(), b=b"\xff", d={"__type__": "bytes", "__value__": "x"}) == [
        "datetime",
        "date",
        "time",
        "Decimal",
        "UUID",
        "bytes",
        "dict:__type__,__value__",
    ]


def test_a_datetime_result_is_a_result_and_a_set_is_unserializable(
    serve: Callable[..., RPCServer], proxy: RPCProxy, typed_registry: Registry
) -> None:
    serve(registry=typed_registry)
    assert proxy.make("datetime") == datetime.datetime(2024, 2, 29, 12, 0, 1)
    with pytest.raises(RemoteError) as info:
        proxy.make("set")
    assert info.value.exc_type == "UnserializableResult"
    assert proxy.echo("still serving") == {"args": ["still serving"], "kwargs": {}}


def test_pickle_carries_every_value_untouched_where_the_server_accepts_it(
    serve: Callable[..., RPCServer], proxies: Callable[..., RPCProxy], typed_registry: Registry
) -> None:
    serve(registry=typed_registry, accept=["json", "pickle"])
    value = {**everything(), "tuple": (1, 2), "set": {1, 2}}
    same(proxies(serializer="pickle").echo(value), {"args": [value], "kwargs": {}})


def test_msgpack_carries_look_alikes_untouched_where_the_server_accepts_it(
    serve: Callable[..., RPCServer], proxies: Callable[..., RPCProxy], typed_registry: Registry
) -> None:
    pytest.importorskip("msgpack")
    serve(registry=typed_registry, accept=["json", "msgpack"])
    value = [param.values[0] for param in LOOK_ALIKES] + [b"\xff", "text"]
    same(proxies(serializer="msgpack").echo(value), {"args": [value], "kwargs": {}})


# -- on the wire, with clients that are not kombu_rpc's ---------------------------------


def test_a_plain_kombu_client_sends_typed_values_and_reads_escaped_look_alikes(
    serve: Callable[..., RPCServer], raw: RawClient, typed_registry: Registry
) -> None:
    serve(registry=typed_registry)
    # Given a request written by kombu's own JSON serializer: a typed value and an escape
    when = datetime.datetime(2024, 2, 29, 12, tzinfo=datetime.timezone.utc)
    escaped = {ESCAPE_KEY: [["__type__", "t"], ["__value__", 1]]}
    request = kombu_json.dumps({"method": "types_of", "args": [when, escaped]})
    # Then the function receives a datetime and the mapping the escape stands for
    assert raw.reply(raw.send(request)) == {"result": ["datetime", "dict:__type__,__value__"]}
    # And a reply carrying that mapping escapes it the same way, as docs/protocol.md says
    reply = raw.reply(raw.send(kombu_json.dumps({"method": "echo", "args": [when, escaped]})))
    assert reply == {"result": {"args": [when, escaped], "kwargs": {}}}
    assert json.loads(raw.last_message.body)["result"]["args"] == [
        {"__type__": "datetime", "__value__": "2024-02-29T12:00:00+00:00"},
        escaped,
    ]


@pytest.mark.parametrize(
    "argument, says",
    [
        pytest.param({ESCAPE_KEY: "not pairs"}, ESCAPE_KEY, id="malformed-escape"),
        pytest.param({"__type__": "no-such-type", "__value__": 1}, "Unsupported type", id="unknown-type"),
        pytest.param({"__type__": "date", "__value__": "yesterday"}, "yesterday", id="unparsable-value"),
    ],
)
def test_an_undecodable_json_body_is_refused_and_the_server_keeps_serving(
    serve: Callable[..., RPCServer],
    raw: RawClient,
    proxy: RPCProxy,
    typed_registry: Registry,
    argument: Any,
    says: str,
) -> None:
    serve(registry=typed_registry)
    # Given a client that is not kombu_rpc's writing a bad escape or typed value by hand
    error = raw.reply(raw.send(json.dumps({"method": "echo", "args": [argument]})))["error"]
    assert (error["kind"], error["type"]) == ("malformed_request", "DecodeError")
    assert says in error["message"]
    assert proxy.echo(1) == {"args": [1], "kwargs": {}}


def test_a_tutorial_client_is_told_to_use_plain(serve: Callable[..., RPCServer], raw: RawClient) -> None:
    serve()
    # Given the RabbitMQ tutorial's client: bare text, no content type
    error = raw.reply(raw.send(b"30", content_type="application/data"))["error"]
    # Then the refusal says what this server speaks and which server the client needs
    assert (error["kind"], error["type"]) == ("malformed_request", "MalformedRequest")
    assert "kombu_rpc's envelope" in error["message"] and "codec=Plain(" in error["message"]


def test_the_tutorial_pika_client_is_told_to_use_plain_on_rabbitmq(
    amqp_url: str, queue_name: str, registry: Registry
) -> None:
    pika = pytest.importorskip("pika")
    # Given a kombu_rpc server with the default envelope, and the tutorial's client
    server = RPCServer(amqp_url, registry=registry, queue=queue_name)
    with server.running(), pika.BlockingConnection(pika.ConnectionParameters(host="127.0.0.1")) as conn:
        channel = conn.channel()
        reply_to = channel.queue_declare(queue="", exclusive=True).method.queue
        # When it publishes the bare argument, with no content type, as the tutorial does
        properties = pika.BasicProperties(reply_to=reply_to, correlation_id="tutorial-1")
        channel.basic_publish(exchange="", routing_key=queue_name, properties=properties, body="30")
        _method, props, body = next(channel.consume(reply_to, auto_ack=True, inactivity_timeout=20))
        channel.cancel()
    assert body is not None, "no reply within 20 s"
    # Then the reply names the envelope and the Plain codec
    assert props.correlation_id == "tutorial-1"
    error = json.loads(body)["error"]
    assert error["type"] == "MalformedRequest"
    assert "kombu_rpc's envelope" in error["message"] and "codec=Plain(" in error["message"]
