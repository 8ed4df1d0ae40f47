"""The server's dispatcher on its own: request messages in, encoded replies (or
refusals) out, with no broker and no threads."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from kombu.serialization import loads

from kombu_rpc import Registry, metrics, protocol
from kombu_rpc._dispatch import Dispatcher, Disposal, Refused, Reply
from kombu_rpc.codecs import PLAIN_ERROR_HEADER, Codec, Envelope, Plain

pytestmark = pytest.mark.timeout(10)

SECRET = b"0123456789abcdef-secret"


class FakeMessage:
    """What the dispatcher reads of a kombu message."""

    def __init__(
        self,
        body: Any,
        content_type: str = "application/json",
        content_encoding: str = "utf-8",
        headers: dict[str, Any] | None = None,
        reply_to: str | None = "replies",
        correlation_id: str | None = "call-1",
        redelivered: bool = False,
    ) -> None:
        self.body = body
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.headers = headers if headers is not None else {}
        self.properties: dict[str, Any] = {}
        if reply_to is not None:
            self.properties["reply_to"] = reply_to
        if correlation_id is not None:
            self.properties["correlation_id"] = correlation_id
        self.delivery_info = {"redelivered": redelivered}

    def decode(self) -> Any:
        return loads(self.body, self.content_type, self.content_encoding, accept={self.content_type})


def request(
    method: str,
    *args: Any,
    headers: dict[str, Any] | None = None,
    secret: bytes | None = None,
    **kwargs: Any,
) -> FakeMessage:
    """A request message as a proxy publishes it (signed with ``secret``, if given)."""
    encoded = protocol.encode(protocol.request_body(method, args, kwargs), "json")
    headers = dict(headers or {})
    if secret is not None:
        deadline = headers.get(protocol.DEADLINE_HEADER)
        headers.update(protocol.signature_headers(secret, "request", encoded, "call-1", "replies", deadline))
    return FakeMessage(encoded.payload, encoded.content_type, encoded.content_encoding, headers)


@pytest.fixture
def registry() -> Registry:
    reg = Registry()

    @reg.remote
    def add(a: int, b: int) -> int:
        return a + b

    @reg.remote(expected=(ValueError,))
    def fail(text: str) -> None:
        raise ValueError(text)

    @reg.remote
    async def double(x: int) -> int:
        return 2 * x

    @reg.remote
    def unserializable() -> object:
        return object()

    return reg


def dispatcher(registry: Registry, codec: Codec | None = None, **kwargs: Any) -> Dispatcher:
    return Dispatcher(registry, codec or Envelope(), "server-1", "q", **kwargs)


def body_of(reply: Reply | None) -> Any:
    assert reply is not None
    address, encoded, headers = reply
    assert (address.reply_to, address.correlation_id) == ("replies", "call-1")
    assert headers[protocol.SERVER_ID_HEADER] == "server-1"
    return json.loads(encoded.payload)


def refusal(dispatch: Dispatcher, message: FakeMessage) -> Refused:
    with pytest.raises(Refused) as raised:
        dispatch.prepare(message)
    return raised.value


def error_type(reply: Reply | None) -> str:
    error: str = body_of(reply)["error"]["type"]
    return error


def handle(dispatch: Dispatcher, message: FakeMessage) -> Reply | None:
    return dispatch.run(dispatch.prepare(message))


def test_a_call_runs_and_its_result_is_encoded(registry: Registry) -> None:
    assert body_of(handle(dispatcher(registry), request("add", 2, b=3))) == {"result": 5}


def test_an_async_function_runs_through_run_coroutine(registry: Registry) -> None:
    assert body_of(handle(dispatcher(registry), request("double", 21))) == {"result": 42}


def test_a_cast_runs_and_has_no_reply(registry: Registry) -> None:
    message = request("add", 1, 2)
    message.properties = {}
    assert handle(dispatcher(registry), message) is None


def test_an_unknown_method_is_refused_with_method_not_found(registry: Registry) -> None:
    refused = refusal(dispatcher(registry), request("nope"))
    assert refused.disposal is Disposal.SETTLE
    assert error_type(refused.reply) == "MethodNotFound"


def test_arguments_that_do_not_fit_are_refused_with_invalid_arguments(registry: Registry) -> None:
    refused = refusal(dispatcher(registry), request("add", 1, 2, 3))
    assert refused.disposal is Disposal.SETTLE
    assert error_type(refused.reply) == "TypeError"


def test_an_exception_of_the_function_is_the_reply(registry: Registry) -> None:
    error = body_of(handle(dispatcher(registry, send_tracebacks=False), request("fail", "boom")))["error"]
    assert (error["type"], error["message"]) == ("ValueError", "boom")


def test_an_unserializable_result_is_an_error_reply(registry: Registry) -> None:
    assert error_type(handle(dispatcher(registry), request("unserializable"))) == "UnserializableResult"


def test_an_undecodable_body_is_rejected_with_a_json_error_reply(registry: Registry) -> None:
    refused = refusal(dispatcher(registry), FakeMessage(b"{not json"))
    assert refused.disposal is Disposal.REJECT
    assert error_type(refused.reply) == "DecodeError"
    kombu_refused = dispatcher(registry).undecodable(FakeMessage(b"x"), ValueError("bad"))
    assert kombu_refused.disposal is Disposal.REJECT
    assert error_type(kombu_refused.reply) == "DecodeError"


def test_a_body_larger_than_max_message_size_is_rejected(registry: Registry) -> None:
    refused = refusal(dispatcher(registry, max_message_size=10), request("add", 1, 2))
    assert refused.disposal is Disposal.REJECT
    assert error_type(refused.reply) == "MessageTooLarge"


def test_a_malformed_request_without_reply_address_is_rejected_unanswered(registry: Registry) -> None:
    refused = refusal(dispatcher(registry), FakeMessage(b"[1]", reply_to=None))
    assert (refused.disposal, refused.reply) == (Disposal.REJECT, None)


def test_a_request_past_its_deadline_is_acked_unanswered(registry: Registry) -> None:
    message = request("add", 1, 2, headers={protocol.DEADLINE_HEADER: time.time() - 1})
    refused = refusal(dispatcher(registry), message)
    assert (refused.disposal, refused.reply) == (Disposal.ACK, None)


def test_a_signed_request_runs_and_its_reply_is_signed(registry: Registry) -> None:
    reply = handle(dispatcher(registry, secret=SECRET), request("add", 1, 2, secret=SECRET))
    assert body_of(reply) == {"result": 3}
    assert reply is not None and protocol.SIGNATURE_HEADER in reply[2]


@pytest.mark.parametrize("secret", [None, b"another secret, 16+ bytes"])
def test_an_unsigned_or_wrongly_signed_request_is_rejected(registry: Registry, secret: bytes | None) -> None:
    refused = refusal(dispatcher(registry, secret=SECRET), request("add", 1, 2, secret=secret))
    assert refused.disposal is Disposal.REJECT
    assert error_type(refused.reply) == "InvalidSignature"


def test_a_replayed_request_is_rejected_but_a_redelivery_runs(registry: Registry) -> None:
    dispatch = dispatcher(registry, secret=SECRET)
    message = request("add", 1, 2, secret=SECRET)
    assert body_of(handle(dispatch, message)) == {"result": 3}
    message.delivery_info = {"redelivered": True}
    assert body_of(handle(dispatch, message)) == {"result": 3}
    message.delivery_info = {"redelivered": False}
    assert error_type(refusal(dispatch, message).reply) == "InvalidSignature"


def test_ping_and_describe_are_built_in(registry: Registry) -> None:
    dispatch = dispatcher(registry)
    pong = body_of(handle(dispatch, request("kombu_rpc.ping")))["result"]
    assert (pong["server_id"], pong["queue"]) == ("server-1", "q")
    names = [entry["name"] for entry in body_of(handle(dispatch, request("kombu_rpc.describe")))["result"]]
    assert names == [*(p.name for p in registry), "kombu_rpc.ping", "kombu_rpc.describe"]


def test_the_plain_codec_runs_its_one_function_on_the_bare_body(registry: Registry) -> None:
    reg = Registry()

    @reg.remote
    def fib(n: int) -> int:
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    dispatch = dispatcher(reg, Plain("fib"))
    reply = handle(dispatch, FakeMessage(b"10", content_type="text/plain"))
    assert reply is not None and reply[1].payload in ("55", b"55")
    failed = handle(dispatch, FakeMessage(b'"x"', content_type="text/plain"))
    assert failed is not None and PLAIN_ERROR_HEADER in failed[2]


class Counts(metrics.Recorder):
    """A recorder that keeps what the dispatcher reports."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, str, float | None]] = []
        self.refused: list[str] = []

    def server_call_ended(
        self, queue: str, method: str, outcome: str, seconds: float, queue_wait: float | None
    ) -> None:
        self.ended.append((method, outcome, queue_wait))

    def server_call_refused(self, queue: str, method: str) -> None:
        self.refused.append(method)


def test_the_queue_wait_ends_when_the_call_starts(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = Counts()
    monkeypatch.setattr(metrics, "recorder", counts)
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])

    @registry.remote
    def slow() -> None:
        clock[0] += 60  # the call runs a minute: no part of the queue wait

    dispatcher = Dispatcher(registry, Envelope(), "server-1", "q")
    dispatcher.run(dispatcher.prepare(request("slow", headers={protocol.SENT_AT_HEADER: 998.0})))
    dispatcher.run(dispatcher.prepare(request("add", 1, 2)))  # no header: no queue wait
    assert counts.ended == [("slow", "ok", 2.0), ("add", "ok", None)]


def test_refusals_are_counted_without_the_callers_names(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = Counts()
    monkeypatch.setattr(metrics, "recorder", counts)
    dispatcher = Dispatcher(registry, Envelope(), "server-1", "q")
    for message in (request("add", 1), request("no.such.function"), FakeMessage(b"not json")):
        with pytest.raises(Refused):
            dispatcher.prepare(message)
    assert counts.refused == ["add", "", ""]
