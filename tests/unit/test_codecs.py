"""The envelope's encoding: JSON values and kombu's typed values come back as they were
sent, look-alike mappings are escaped, and other serializers are left alone."""

from __future__ import annotations

import datetime
import json
import pickle
import uuid
from decimal import Decimal
from typing import Any

import pytest
from kombu.message import Message
from kombu.serialization import dumps
from kombu.utils.json import dumps as kombu_json_dumps

from kombu_rpc import MalformedRequest, RemoteError, SerializationError
from kombu_rpc.codecs import Envelope
from kombu_rpc.protocol import (
    ESCAPE_KEY,
    Encoded,
    decode,
    encode,
    escape_json,
    parse_request,
    unescape_json,
)

pytestmark = pytest.mark.timeout(10)

ACCEPT = {"application/json", "application/x-python-serialize", "application/data"}

#: kombu's JSON serializer writes these as {"__type__": ..., "__value__": ...}.
TYPED_VALUES = [
    pytest.param(datetime.datetime(2024, 2, 29, 23, 59, 59, 123456), id="naive-datetime"),
    pytest.param(datetime.datetime(2024, 2, 29, 12, tzinfo=datetime.timezone.utc), id="utc-datetime"),
    pytest.param(
        datetime.datetime(2024, 2, 29, 12, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))),
        id="offset-datetime",
    ),
    pytest.param(datetime.date(2024, 2, 29), id="date"),
    pytest.param(datetime.time(23, 59, 59, 1), id="time"),
    pytest.param(datetime.time(8, tzinfo=datetime.timezone(datetime.timedelta(hours=-3))), id="offset-time"),
    pytest.param(Decimal("1.10"), id="decimal-keeps-its-digits"),
    pytest.param(Decimal("-0"), id="decimal-negative-zero"),
    pytest.param(Decimal("123456789012345678901234567890.000000001"), id="decimal-beyond-float"),
    pytest.param(uuid.UUID("12345678-1234-5678-1234-567812345678"), id="uuid"),
    pytest.param(b"caf\xc3\xa9", id="utf8-bytes"),
    pytest.param(b"\xff\x00\xfe", id="binary-bytes"),
    pytest.param(b"", id="empty-bytes"),
]

#: Ordinary JSON values that look like kombu's typed values or like kombu_rpc's escape.
LOOK_ALIKES = [
    pytest.param({"__type__": "datetime", "__value__": "2024-02-29T00:00:00"}, id="datetime-marker"),
    pytest.param({"__type__": "bytes", "__value__": "abc"}, id="bytes-marker"),
    pytest.param({"__type__": "base64", "__value__": "/w=="}, id="base64-marker"),
    pytest.param({"__type__": "uuid", "__value__": {"hex": "0" * 32}}, id="uuid-marker"),
    pytest.param({"__type__": "no-such-type", "__value__": 1}, id="unknown-marker"),
    pytest.param({"__type__": "datetime", "__value__": "not a date"}, id="bad-datetime-marker"),
    pytest.param({"__type__": None, "__value__": None}, id="null-marker"),
    pytest.param({"__type__": "x", "__value__": 1, "other": 2}, id="marker-and-more"),
    pytest.param({"__type__": "x"}, id="type-only"),
    pytest.param({ESCAPE_KEY: [["__type__", "x"], ["__value__", 1]]}, id="escape-look-alike"),
    pytest.param({ESCAPE_KEY: "not pairs"}, id="bad-escape-look-alike"),
    pytest.param({ESCAPE_KEY: 1, "other": 2}, id="escape-key-and-more"),
    pytest.param(
        {"__type__": "outer", "__value__": {"__type__": "inner", "__value__": [{ESCAPE_KEY: []}]}},
        id="nested-markers",
    ),
    pytest.param(
        [{"__type__": "decimal", "__value__": "1"}, {"k": {"__type__": "date", "__value__": "2024-01-01"}}],
        id="markers-in-lists",
    ),
    pytest.param("__type__ __value__ " + ESCAPE_KEY, id="the-names-as-text"),
    pytest.param({"\u00e9": {"__type__": "x", "__value__": "\u00e9"}}, id="marker-in-non-ascii-text"),
]


def same(received: Any, sent: Any) -> None:
    """Assert ``received`` is ``sent``'s value and type at every depth (``==`` alone
    takes ``Decimal("1.1")`` for ``Decimal("1.10")`` and ``1`` for ``True``)."""
    assert type(received) is type(sent), (received, sent)
    if isinstance(sent, dict):
        assert list(received) == list(sent)
        for key in sent:
            same(received[key], sent[key])
    elif isinstance(sent, list):
        assert len(received) == len(sent)
        for got, want in zip(received, sent, strict=True):
            same(got, want)
    elif isinstance(sent, (Decimal, datetime.datetime, datetime.time)):
        assert str(received) == str(sent)  # digits, microseconds and UTC offset
    else:
        assert received == sent


def received(encoded: Encoded, *, as_bytes: bool = True) -> Message:
    """The message a consumer gets for ``encoded`` (bytes, as py-amqp and Redis give)."""
    payload = encoded.payload
    if as_bytes and isinstance(payload, str):
        payload = payload.encode(encoded.content_encoding)
    return Message(
        body=payload,
        content_type=encoded.content_type,
        content_encoding=encoded.content_encoding,
        accept=ACCEPT,
    )


def round_trip(value: Any, serializer: str = "json") -> Any:
    return decode(received(encode({"result": value}, serializer)))["result"]


@pytest.mark.parametrize("value", TYPED_VALUES + LOOK_ALIKES)
def test_every_value_comes_back_as_it_was_sent(value: Any) -> None:
    same(round_trip(value), value)
    same(round_trip({"nested": [value, {"again": value}]}), {"nested": [value, {"again": value}]})


@pytest.mark.parametrize("value", TYPED_VALUES + LOOK_ALIKES)
def test_requests_and_replies_carry_every_value(value: Any) -> None:
    # Given kombu_rpc's own codec on both sides
    codec = Envelope()
    # When a value travels as an argument, a keyword argument and a result
    request = codec.decode_request(received(codec.encode_request("echo", (value,), {"v": value}, "json")))
    encoded, headers = codec.encode_reply({"result": value}, "json")
    # Then each arrives as it was sent
    assert (request.method, headers) == ("echo", {})
    same(request.args, [value])
    same(request.kwargs, {"v": value})
    same(codec.decode_reply(received(encoded)), value)


def test_typed_values_are_written_as_kombu_writes_them() -> None:
    # kombu_rpc's bodies stay readable by any kombu consumer, and kombu's by kombu_rpc.
    body = {"method": "m", "args": [datetime.date(2024, 2, 29), Decimal("1.5"), b"\xff"], "kwargs": {}}
    assert encode(body, "json").payload == kombu_json_dumps(body)
    assert json.loads(kombu_json_dumps(body))["args"] == [
        {"__type__": "date", "__value__": "2024-02-29"},
        {"__type__": "decimal", "__value__": "1.5"},
        {"__type__": "base64", "__value__": "/w=="},
    ]


def test_bodies_without_look_alikes_are_exactly_kombus_json() -> None:
    body = {"method": "m", "args": [1, "é", [None, True, 2.5]], "kwargs": {"type": "__type__ as a value"}}
    assert encode(body, "json") == Encoded(kombu_json_dumps(body), "application/json", "utf-8")


def test_a_look_alike_is_escaped_as_a_list_of_pairs_on_the_wire() -> None:
    body = {"result": {"__type__": "bytes", "__value__": {ESCAPE_KEY: 1}}}
    assert json.loads(encode(body, "json").payload) == {
        "result": {ESCAPE_KEY: [["__type__", "bytes"], ["__value__", {ESCAPE_KEY: [[ESCAPE_KEY, 1]]}]]}
    }


def test_escaping_leaves_the_value_alone_and_returns_it_when_nothing_is_escaped() -> None:
    plain = {"a": [1, {"b": (2, 3)}], "c": datetime.date(2024, 1, 1)}
    assert escape_json(plain) is plain
    look_alike = {"__type__": "x", "__value__": [1]}
    outer = {"a": (look_alike,)}
    escaped = escape_json(outer)
    assert escaped == {"a": [{ESCAPE_KEY: [["__type__", "x"], ["__value__", [1]]]}]}
    assert outer == {"a": (look_alike,)} and look_alike == {"__type__": "x", "__value__": [1]}
    assert unescape_json(escaped) == {"a": [look_alike]}


def test_unescaping_does_not_change_the_decoded_body_kombu_caches() -> None:
    message = received(encode({"result": {ESCAPE_KEY: 1}}, "json"))
    assert decode(message) == {"result": {ESCAPE_KEY: 1}}
    assert decode(message) == {"result": {ESCAPE_KEY: 1}}  # kombu returns its cached body again


def test_an_escape_spelled_with_unicode_escapes_is_read() -> None:
    # Another JSON writer may spell the key's characters as \u escapes.
    spelled = '{"result": {"\\u005f_kombu_rpc_dict__": [["__type__", "t"], ["__value__", 1]]}}'
    message = received(Encoded(spelled, "application/json", "utf-8"))
    assert decode(message) == {"result": {"__type__": "t", "__value__": 1}}


@pytest.mark.parametrize("ensure_ascii", [True, False], ids=["ascii", "utf-8"])
@pytest.mark.parametrize("as_bytes", [True, False], ids=["bytes-body", "text-body"])
def test_an_escape_is_read_from_bytes_and_text(as_bytes: bool, ensure_ascii: bool) -> None:
    text = json.dumps(
        {"result": {ESCAPE_KEY: [["__type__", "t"], ["__value__", "é"]]}}, ensure_ascii=ensure_ascii
    )
    message = received(Encoded(text, "application/json", "utf-8"), as_bytes=as_bytes)
    assert decode(message) == {"result": {"__type__": "t", "__value__": "é"}}


@pytest.mark.parametrize(
    "escape",
    [
        pytest.param("pairs", id="not-a-list"),
        pytest.param([["a"]], id="a-pair-of-one"),
        pytest.param([["a", 1, 2]], id="a-pair-of-three"),
        pytest.param([[1, 1]], id="a-key-not-a-string"),
        pytest.param([{"a": 1}], id="a-mapping-not-a-pair"),
    ],
)
def test_a_malformed_escape_is_a_malformed_request(escape: Any) -> None:
    text = json.dumps({"method": "echo", "args": [{ESCAPE_KEY: escape}]})
    with pytest.raises(MalformedRequest) as info:
        parse_request(received(Encoded(text, "application/json", "utf-8")))
    assert info.value.exc_type == "DecodeError"
    assert ESCAPE_KEY in info.value.exc_message


def test_a_malformed_escape_in_a_reply_cannot_be_read() -> None:
    text = json.dumps({"result": {ESCAPE_KEY: "pairs"}})
    with pytest.raises(ValueError, match=ESCAPE_KEY):
        Envelope().decode_reply(received(Encoded(text, "application/json", "utf-8")))


def test_values_json_cannot_carry_are_a_serialization_error() -> None:
    for value in [{1, 2}, bytearray(b"x"), object(), {(1, 2): "tuple key"}]:
        with pytest.raises(SerializationError):
            encode({"result": value}, "json")


def test_a_failure_reply_is_still_raised() -> None:
    body = {"error": {"kind": "error", "type": "ValueError", "message": "m", "traceback": ""}}
    encoded, _ = Envelope().encode_reply(body, "json")
    with pytest.raises(RemoteError) as info:
        Envelope().decode_reply(received(encoded))
    assert (info.value.exc_type, info.value.exc_message) == ("ValueError", "m")


# -- other serializers --------------------------------------------------------------


@pytest.mark.parametrize("value", TYPED_VALUES + LOOK_ALIKES)
def test_pickle_bodies_are_not_escaped(value: Any) -> None:
    body = {"result": [value, {"k": value}]}
    encoded = encode(body, "pickle")
    assert encoded == Encoded(*_kombu_dumps(body, "pickle"))
    assert pickle.loads(encoded.payload) == body
    same(round_trip([value, {"k": value}], "pickle"), [value, {"k": value}])


@pytest.mark.parametrize("value", LOOK_ALIKES)
def test_msgpack_bodies_are_not_escaped(value: Any) -> None:
    msgpack = pytest.importorskip("msgpack")
    body = {"result": [value]}
    encoded = encode(body, "msgpack")
    assert encoded == Encoded(*_kombu_dumps(body, "msgpack"))
    assert msgpack.unpackb(encoded.payload, raw=False) == body
    message = Message(
        body=encoded.payload,
        content_type=encoded.content_type,
        content_encoding=encoded.content_encoding,
        accept={encoded.content_type},
    )
    assert decode(message) == body


def _kombu_dumps(body: Any, serializer: str) -> tuple[Any, str, str]:
    content_type, content_encoding, payload = dumps(body, serializer=serializer)
    return payload, content_type, content_encoding


# -- not kombu_rpc's envelope -------------------------------------------------------


@pytest.mark.parametrize(
    "payload, content_type",
    [
        pytest.param(b"30", "application/data", id="tutorial-client-bare-text"),
        pytest.param("30", "application/json", id="a-json-number"),
        pytest.param("[1, 2]", "application/json", id="a-json-list"),
    ],
)
def test_a_body_that_is_not_the_envelope_points_to_plain(payload: Any, content_type: str) -> None:
    with pytest.raises(MalformedRequest) as info:
        parse_request(
            received(Encoded(payload, content_type, "binary" if isinstance(payload, bytes) else "utf-8"))
        )
    message = info.value.exc_message
    assert info.value.exc_type == "MalformedRequest"
    assert "body must be a mapping" in message and "kombu_rpc's envelope" in message
    assert "codec=Plain(" in message and "tutorial" in message
