"""Call context: call ids, parent chains, traceparent, OpenTelemetry spans, log records."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kombu_rpc import CallContext, CallIdFilter, Registry, RPCProxy, RPCServer, current_call
from kombu_rpc import context as context_module
from kombu_rpc.testing import unique_queue_name

from ..conftest import delete_queue
from .conftest import RawClient

pytestmark = pytest.mark.timeout(60)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Trace into an in-memory exporter for one test. The provider is not made the
    global one (that can be set only once, and would trace every later test)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(context_module, "_tracer", provider.get_tracer("kombu_rpc"))
    monkeypatch.setattr(context_module, "tracing", lambda: True)
    yield exporter
    provider.shutdown()


@pytest.fixture
def chain(broker_url: str, serve: Callable[..., RPCServer], servers: ExitStack) -> Iterator[dict[str, Any]]:
    """Three services: ``outer`` calls ``middle``, which calls ``inner``; each records
    the context it ran in."""
    seen: dict[str, Any] = {}
    queues = {name: unique_queue_name() for name in ("outer", "middle", "inner")}
    for queue in queues.values():  # once their servers stopped (the stack unwinds in reverse)
        servers.callback(delete_queue, broker_url, queue)
    proxies = {name: RPCProxy(broker_url, queue=queue, timeout=10) for name, queue in queues.items()}
    registries = {name: Registry() for name in queues}

    @registries["inner"].remote
    def inner() -> str:
        seen["inner"] = current_call()
        return "inner"

    @registries["middle"].remote
    def middle() -> str:
        seen["middle"] = current_call()
        return str(proxies["inner"].inner())

    @registries["outer"].remote
    def outer() -> str:
        seen["outer"] = current_call()
        return str(proxies["middle"].middle())

    for name in queues:
        seen[f"{name}_server"] = serve(registry=registries[name], queue=queues[name]).server_id
    seen["proxy"] = proxies["outer"]
    yield seen
    for proxy in proxies.values():
        proxy.close()


def test_a_remote_function_sees_its_call_and_nested_calls_carry_the_chain(chain: dict[str, Any]) -> None:
    assert current_call() is None  # outside any remote call
    future = chain["proxy"].outer.call_async()
    assert future.result() == "inner"
    outer, middle, inner = chain["outer"], chain["middle"], chain["inner"]
    assert isinstance(outer, CallContext)
    assert (outer.method, outer.parents, outer.server_id) == ("outer", (), chain["outer_server"])
    assert outer.deadline is not None
    assert (middle.method, middle.parents) == ("middle", (outer.call_id,))
    assert (inner.method, inner.parents) == ("inner", (outer.call_id, middle.call_id))
    assert inner.chain == (outer.call_id, middle.call_id, inner.call_id)
    assert len({outer.call_id, middle.call_id, inner.call_id}) == 3
    assert inner.server_id == chain["inner_server"]


def test_spans_follow_the_calls_with_opentelemetry(
    chain: dict[str, Any], spans: InMemorySpanExporter
) -> None:
    assert chain["proxy"].outer() == "inner"
    finished = spans.get_finished_spans()
    by_name = {(s.name, s.kind): s for s in finished}
    assert len(finished) == 6, [s.name for s in finished]
    # one trace: client outer -> server outer -> client middle -> server middle -> ...
    assert len({s.context.trace_id for s in finished}) == 1
    order = [
        ("outer", trace.SpanKind.CLIENT),
        ("outer", trace.SpanKind.SERVER),
        ("middle", trace.SpanKind.CLIENT),
        ("middle", trace.SpanKind.SERVER),
        ("inner", trace.SpanKind.CLIENT),
        ("inner", trace.SpanKind.SERVER),
    ]
    for parent, child in itertools.pairwise(order):
        assert by_name[child].parent is not None
        assert by_name[child].parent.span_id == by_name[parent].context.span_id
    server = by_name[("inner", trace.SpanKind.SERVER)]
    assert server.attributes is not None
    assert server.attributes["rpc.system"] == "kombu_rpc"
    assert server.attributes["kombu_rpc.call_id"] == chain["inner"].call_id
    assert chain["inner"].traceparent is not None
    assert chain["inner"].traceparent.split("-")[1] == format(server.context.trace_id, "032x")


def test_a_failing_call_marks_both_spans_failed(
    serve: Callable[..., RPCServer], proxy: RPCProxy, spans: InMemorySpanExporter
) -> None:
    serve()
    with pytest.raises(Exception, match="nope"):
        proxy.boom("nope")
    finished = spans.get_finished_spans()
    assert [s.status.status_code for s in finished] == [trace.StatusCode.ERROR] * 2


def test_without_opentelemetry_a_traceparent_is_passed_on(
    chain: dict[str, Any], monkeypatch: pytest.MonkeyPatch, raw: RawClient
) -> None:
    monkeypatch.setattr(context_module, "trace", None)
    monkeypatch.setattr(context_module, "propagate", None)
    # A caller that is not kombu_rpc sends a traceparent; the chain passes it on as it is
    raw.queue = chain["proxy"].queue
    cid = raw.send(json.dumps({"method": "outer"}), headers={"traceparent": TRACEPARENT})
    assert raw.reply(cid) == {"result": "inner"}
    assert (
        chain["outer"].traceparent == chain["middle"].traceparent == chain["inner"].traceparent == TRACEPARENT
    )


@pytest.mark.parametrize(
    "headers",
    [
        {"x-rpc-parents": [1, 2], "traceparent": "bogus", "x-rpc-call-id": 42},
        {"x-rpc-parents": "not-a-list", "x-rpc-call-id": "has spaces in it"},
        {"x-rpc-parents": ["x" * 500]},
    ],
)
def test_malformed_context_headers_are_ignored(
    serve: Callable[..., RPCServer], registry: Registry, raw: RawClient, headers: dict[str, Any]
) -> None:
    seen: list[CallContext | None] = []
    registry.register(lambda: seen.append(current_call()), name="look")
    serve()
    cid = raw.send(json.dumps({"method": "look"}), headers=headers)
    assert raw.reply(cid) == {"result": None}
    assert seen[0] is not None
    assert (seen[0].call_id, seen[0].parents, seen[0].traceparent) == (cid, (), None)


def test_async_functions_see_their_call_too(
    serve: Callable[..., RPCServer], registry: Registry, proxy: RPCProxy
) -> None:
    async def look() -> str | None:
        await asyncio.sleep(0)
        call = current_call()
        return None if call is None else call.method

    registry.register(look)
    serve()
    assert proxy.look() == "look"


def test_logs_name_the_call(
    serve: Callable[..., RPCServer], registry: Registry, proxy: RPCProxy, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("tests.context")
    logger.addFilter(CallIdFilter())
    registry.register(lambda: logger.warning("inside"), name="log_inside")
    serve()
    with caplog.at_level(logging.DEBUG, logger="kombu_rpc.server"):
        proxy.log_inside()
    inside = next(r for r in caplog.records if r.getMessage() == "inside")
    call_id = inside.__dict__["call_id"]
    assert call_id not in ("", "-")
    assert any(r.name == "kombu_rpc.server" and call_id in r.getMessage() for r in caplog.records)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "outside", None, None)
    assert CallIdFilter().filter(record) and record.__dict__["call_id"] == "-"
