"""Requests that are not valid: the server answers when it can and keeps serving."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from typing import Any

import pytest
from kombu import Queue

from kombu_rpc import RPCProxy, RPCServer
from kombu_rpc.connection import connect
from kombu_rpc.protocol import DEADLINE_HEADER

from ..conftest import Recorder
from .conftest import RawClient


def j(value: Any) -> str:
    return json.dumps(value)


ADDRESSABLE = [
    pytest.param("not json {", "application/json", "DecodeError", id="not-json"),
    pytest.param(
        pickle.dumps({"method": "echo", "args": [1]}),
        "application/x-python-serialize",
        "ContentDisallowed",
        id="pickle",
    ),
    pytest.param("method: echo", "application/x-yaml", "ContentDisallowed", id="yaml"),
    pytest.param(j([1, 2]), "application/json", "MalformedRequest", id="body-a-list"),
    pytest.param(j({"args": []}), "application/json", "MalformedRequest", id="no-method"),
    pytest.param(j({"method": 3}), "application/json", "MalformedRequest", id="method-not-a-string"),
    pytest.param(
        j({"method": "echo", "args": {"a": 1}}), "application/json", "MalformedRequest", id="args-not-a-list"
    ),
    pytest.param(
        j({"method": "echo", "args": [], "kwargs": [1]}),
        "application/json",
        "MalformedRequest",
        id="kwargs-not-a-mapping",
    ),
    pytest.param(b"\xff\xfe", "application/json", "DecodeError", id="bad-utf8"),
]


@pytest.mark.parametrize("body, content_type, exc_type", ADDRESSABLE)
def test_a_malformed_request_gets_an_error_reply(
    serve: Callable[..., RPCServer],
    raw: RawClient,
    proxy: RPCProxy,
    body: Any,
    content_type: str,
    exc_type: str,
) -> None:
    serve()
    correlation_id = raw.send(body, content_type=content_type)
    error = raw.reply(correlation_id)["error"]
    assert (error["kind"], error["type"]) == ("malformed_request", exc_type)
    assert proxy.echo("still serving") == "still serving"


@pytest.mark.parametrize(
    "method, exc_type",
    [("_private", "MethodNotFound"), ("__class__", "MethodNotFound"), ("echo.__globals__", "MethodNotFound")],
)
def test_only_registered_names_are_callable(
    serve: Callable[..., RPCServer], raw: RawClient, method: str, exc_type: str
) -> None:
    serve()
    error = raw.reply(raw.send(j({"method": method, "args": []})))["error"]
    assert error["type"] == exc_type


def test_a_request_without_reply_to_is_run_as_a_cast(
    serve: Callable[..., RPCServer], raw: RawClient, recorder: Recorder
) -> None:
    serve()
    raw.send(j({"method": "record", "args": ["cast"]}), reply=False)
    raw.send(j({"method": "record", "args": ["no id"]}), properties={"correlation_id": None})
    assert sorted(recorder.wait(2)) == ["cast", "no id"]


def test_unanswerable_malformed_requests_are_dropped_and_the_server_goes_on(
    serve: Callable[..., RPCServer], raw: RawClient, proxy: RPCProxy
) -> None:
    serve()
    raw.send("garbage", reply=False)
    raw.send(pickle.dumps(1), reply=False, content_type="application/x-python-serialize")
    assert proxy.echo(2) == 2


def test_a_bad_deadline_header_is_malformed(serve: Callable[..., RPCServer], raw: RawClient) -> None:
    serve()
    for deadline in ["tomorrow", True, [1]]:  # (RabbitMQ itself refuses a NaN header)
        error = raw.reply(raw.send(j({"method": "echo", "args": [1]}), headers={DEADLINE_HEADER: deadline}))
        assert error["error"]["type"] == "MalformedRequest"


def test_a_request_missing_args_and_kwargs_calls_with_none(
    serve: Callable[..., RPCServer], raw: RawClient
) -> None:
    serve()
    assert raw.reply(raw.send(j({"method": "fib"})))["error"]["type"] == "TypeError"
    assert raw.reply(raw.send(j({"method": "boom"})))["error"]["message"] == "bad n"


def test_a_function_raising_system_exit_is_answered_and_the_server_goes_on(
    broker_url: str, queue_name: str, proxies: Callable[..., RPCProxy], servers: Any
) -> None:
    import sys

    from kombu_rpc import Registry, RemoteError

    reg = Registry()
    reg.register(lambda: sys.exit(3), name="leave")
    reg.register(lambda: (_ for _ in ()).throw(KeyboardInterrupt()), name="interrupt")
    reg.register(lambda: 1, name="one")
    servers.enter_context(RPCServer(broker_url, registry=reg, queue=queue_name).running())
    proxy = proxies()
    for name, exc_type in [("leave", "SystemExit"), ("interrupt", "KeyboardInterrupt")]:
        with pytest.raises(RemoteError) as info:
            proxy[name]()
        assert info.value.exc_type == exc_type
    assert proxy.one() == 1


REPLIES = [
    pytest.param("not json", "application/json", None, id="not-json"),
    pytest.param(j({"neither": 1}), "application/json", None, id="no-result-or-error"),
    pytest.param(j({"error": "junk"}), "application/json", None, id="error-not-a-mapping"),
    pytest.param(pickle.dumps({"result": 1}), "application/x-python-serialize", None, id="pickle"),
    pytest.param(j({"result": 42}), "application/json", 42, id="valid-then-duplicate"),
]


@pytest.mark.parametrize("body, content_type, result", REPLIES)
def test_bad_or_duplicate_replies_end_the_call_cleanly(
    broker_url: str,
    queue_name: str,
    proxy: RPCProxy,
    log_waiter: Any,
    body: Any,
    content_type: str,
    result: Any,
) -> None:
    from kombu_rpc import RemoteError

    with connect(broker_url) as conn:
        # Given a fake server that takes the request off the queue by hand
        requests = conn.SimpleQueue(Queue(queue_name, routing_key=queue_name), no_ack=True)
        future = proxy.echo.call_async(1)
        request = requests.get(block=True, timeout=10)
        reply_to, correlation_id = request.properties["reply_to"], request.properties["correlation_id"]
        duplicate = log_waiter("dropped a late or duplicate reply")
        # When it answers with this reply, twice
        with conn.Producer() as producer:
            for _ in range(2):
                producer.publish(
                    body,
                    exchange="",
                    routing_key=reply_to,
                    correlation_id=correlation_id,
                    content_type=content_type,
                    content_encoding="utf-8" if isinstance(body, str) else "binary",
                )
        # Then the call ends with the result or a MalformedReply error, and the copy is dropped
        if result is None:
            with pytest.raises(RemoteError) as info:
                future.result(timeout=10)
            assert info.value.exc_type == "MalformedReply"
        else:
            assert future.result(timeout=10) == result
        assert duplicate.seen.wait(10)
        requests.consumer.cancel()
        requests.queue.delete()


def test_a_request_over_max_message_size_is_refused(
    serve: Callable[..., RPCServer], raw: RawClient, proxy: RPCProxy
) -> None:
    serve(max_message_size=1000)
    error = raw.reply(raw.send(j({"method": "echo", "args": ["x" * 2000]})))["error"]
    assert (error["kind"], error["type"]) == ("malformed_request", "MessageTooLarge")
    assert proxy.echo("x" * 500) == "x" * 500


def test_more_hostile_shapes_get_error_replies_and_the_server_goes_on(
    serve: Callable[..., RPCServer], raw: RawClient, proxy: RPCProxy, recorder: Recorder
) -> None:
    serve()
    deep = "[" * 100_000 + "]" * 100_000  # nesting deeper than the JSON decoder allows
    cases = [
        # (body, send options, expected exc_type)
        (deep, {}, "DecodeError"),
        (
            j({"method": "echo", "args": [1]}),
            {"headers": {"compression": "application/x-nosuch"}},
            "DecodeError",
        ),
        (j({"method": "", "args": []}), {}, "MalformedRequest"),
        (j({"method": "echo", "args": [1, 2, 3]}), {}, "TypeError"),
        (j({"method": "echo", "kwargs": {"value": 1, "extra": 2}}), {}, "TypeError"),
        (j({"method": "echo\u0000", "args": [1]}), {}, "MethodNotFound"),
        (j({"method": "math.add.__class__", "args": []}), {}, "MethodNotFound"),
    ]
    for body, options, exc_type in cases:
        error = raw.reply(raw.send(body, **options))["error"]
        assert error["type"] == exc_type, (body[:40], error)
    # compressed bodies are decompressed as kombu does; odd unicode travels intact
    odd = "z\u0301\u202e\U0001f600\ufeff"
    correlation_id = raw.send(j({"method": "echo", "args": [odd]}), compression="zlib")
    assert raw.reply(correlation_id) == {"result": odd}
    assert proxy.echo(odd) == odd


def test_a_function_hitting_recursion_error_is_answered(
    broker_url: str, queue_name: str, proxies: Callable[..., RPCProxy], servers: Any
) -> None:
    from kombu_rpc import Registry, RemoteError

    def forever(n: int) -> int:
        return forever(n + 1)

    reg = Registry()
    reg.register(forever)
    reg.register(lambda: 1, name="one")
    servers.enter_context(RPCServer(broker_url, registry=reg, queue=queue_name).running())
    proxy = proxies()
    with pytest.raises(RemoteError) as info:
        proxy.forever(0)
    assert info.value.exc_type == "RecursionError"
    assert proxy.one() == 1
