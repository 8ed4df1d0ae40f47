"""Events: fanout, direct and topic exchanges (the RabbitMQ tutorials 3 to 5), served by
RPCServer next to its requests, in broadcast and group modes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from kombu import Exchange, Producer, Queue
from prometheus_client import CollectorRegistry

from kombu_rpc import Event, EventPublisher, Registry, RPCProxy, RPCServer, metrics
from kombu_rpc.connection import connect
from kombu_rpc.testing import unique_queue_name
from kombu_rpc.topology import event_exchange, event_queue_name

from ..conftest import MEMORY, LogWaiter, Recorder

pytestmark = pytest.mark.timeout(60)


class Events:
    """A test's exchange, its servers and publishers; deletes what it made on the broker."""

    def __init__(self, broker_url: str, queue: str, stack: ExitStack) -> None:
        self.broker_url = broker_url
        self.queue = queue  # the servers' request queue (deleted by the queue_name fixture)
        self.exchange = unique_queue_name("test.events")
        self.group_queues: list[str] = []
        self._stack = stack

    def server(self, registry: Registry, **kwargs: Any) -> RPCServer:
        for subscription in registry.subscriptions():
            if subscription.group is not None:
                self.group_queues.append(
                    event_queue_name(subscription.exchange, subscription.name, subscription.group, "")
                )
        return RPCServer(self.broker_url, registry=registry, queue=self.queue, **kwargs)

    def serve(self, registry: Registry, **kwargs: Any) -> RPCServer:
        server = self.server(registry, **kwargs)
        self._stack.enter_context(server.running())
        return server

    def publisher(self, type: str) -> EventPublisher:
        return self._stack.enter_context(EventPublisher(self.broker_url, self.exchange, type))

    def publisher_plain(self, type: str) -> EventPublisher:
        return self._stack.enter_context(EventPublisher(self.broker_url, self.exchange, type, plain=True))

    def publish_raw(self, type: str, routing_key: str, body: str, content_type: str) -> None:
        exchange = event_exchange(self.exchange, type)
        with connect(self.broker_url) as conn:
            Producer(conn).publish(
                body,
                exchange=exchange,
                declare=[exchange],  # on Redis, an undeclared exchange routes as a direct one
                routing_key=routing_key,
                content_type=content_type,
                content_encoding="utf-8",
            )

    def clean(self) -> None:
        if self.broker_url == MEMORY:
            return
        with connect(self.broker_url) as conn:
            channel = conn.default_channel
            errors = conn.connection_errors + conn.channel_errors
            for name in set(self.group_queues):
                try:
                    queue = Queue(name, routing_key=name)(channel)
                    queue.purge()
                    queue.delete()
                except errors:
                    pass
            try:
                Exchange(self.exchange, type="topic")(channel).delete()
                if self.broker_url.startswith("redis"):
                    channel.client.delete(
                        f"_kombu.binding.{self.exchange}", f"_kombu.binding_permanent.{self.exchange}"
                    )
            except errors:
                pass


@pytest.fixture
def events(broker_url: str, queue_name: str) -> Iterator[Events]:
    with ExitStack() as stack:
        made = Events(broker_url, queue_name, stack)
        try:
            yield made
        finally:
            stack.close()  # servers stopped, publishers closed
            made.clean()


def recording(
    registry: Registry, recorder: Recorder, exchange: str, key: str | list[str] = "#", **kwargs: Any
) -> None:
    @registry.subscribe(exchange, key, **kwargs)
    def record(event: Event) -> None:
        recorder.add((event.routing_key, event.payload))


def test_fanout_reaches_every_server(events: Events) -> None:
    recorders = [Recorder(), Recorder()]
    for recorder in recorders:
        registry = Registry()
        recording(registry, recorder, events.exchange, type="fanout")
        events.serve(registry)
    # When three log lines are published to a fanout exchange (tutorial 3)
    publisher = events.publisher("fanout")
    for n in range(3):
        publisher.publish("ignored", {"line": n})
    # Then both servers get all three, in order (fanout ignores the routing key)
    for recorder in recorders:
        assert recorder.wait(3) == [("", {"line": n}) for n in range(3)]


def test_direct_routes_by_key(events: Events) -> None:
    recorder = Recorder()
    registry = Registry()
    recording(registry, recorder, events.exchange, "error", type="direct")
    events.serve(registry)
    publisher = events.publisher("direct")
    for severity in ("info", "warning", "error"):
        publisher.publish(severity, severity)
    # the queue is FIFO: "info" or "warning" would have come before "error"
    assert recorder.wait(1) == [("error", "error")]


def test_topic_wildcards(events: Events) -> None:
    one_word, any_words = Recorder(), Recorder()
    registry = Registry()
    recording(registry, one_word, events.exchange, "*.orange.*", name="orange")
    recording(registry, any_words, events.exchange, "lazy.#", name="lazy")
    both = Recorder()  # tutorial 5's second queue: two binding keys
    recording(registry, both, events.exchange, ["*.*.rabbit", "lazy.#"], name="both")
    events.serve(registry)
    publisher = events.publisher("topic")
    for key in [
        "quick.orange.rabbit",
        "lazy.orange.elephant",
        "quick.orange.fox",
        "lazy.brown.fox",
        "quick.brown.fox",
        "quick.orange.male.rabbit",
        "lazy.orange.male.rabbit",
        "end.orange.end",
        "lazy.pink.rabbit",
        "lazy.end",
    ]:
        publisher.publish(key, None)
    assert [key for key, _ in one_word.wait(4)] == [
        "quick.orange.rabbit",
        "lazy.orange.elephant",
        "quick.orange.fox",
        "end.orange.end",
    ]
    assert [key for key, _ in any_words.wait(5)] == [
        "lazy.orange.elephant",
        "lazy.brown.fox",
        "lazy.orange.male.rabbit",
        "lazy.pink.rabbit",
        "lazy.end",
    ]
    # "lazy.pink.rabbit" matches both keys and comes once ("lazy.end", last, would
    # otherwise come after a second copy)
    assert [key for key, _ in both.wait(6)] == [
        "quick.orange.rabbit",
        "lazy.orange.elephant",
        "lazy.brown.fox",
        "lazy.orange.male.rabbit",
        "lazy.pink.rabbit",
        "lazy.end",
    ]


def test_a_group_handles_each_event_once(events: Events) -> None:
    recorder = Recorder()
    registry = Registry()
    recording(registry, recorder, events.exchange, "jobs.*", group="workers")
    servers = [events.serve(registry), events.serve(registry)]
    publisher = events.publisher("topic")
    for n in range(20):
        publisher.publish("jobs.new", n)
    recorder.wait(20)
    for server in servers:  # a duplicate would have come by the time both stopped
        server.stop()
    events_seen = [payload for _, payload in recorder.calls]
    assert sorted(events_seen) == list(range(20))


def test_without_a_group_each_server_handles_every_event(events: Events) -> None:
    recorder = Recorder()
    registry = Registry()
    recording(registry, recorder, events.exchange, "jobs.*")
    events.serve(registry)
    events.serve(registry)
    publisher = events.publisher("topic")
    for n in range(5):
        publisher.publish("jobs.new", n)
    assert sorted(payload for _, payload in recorder.wait(10)) == sorted(list(range(5)) * 2)


def test_a_failing_handler_is_logged_and_its_event_acked(
    events: Events, log_waiter: Callable[[str], LogWaiter]
) -> None:
    failed = log_waiter("event handler")
    attempts = Recorder()
    registry = Registry()

    @registry.subscribe(events.exchange, "#")
    def fragile(event: Event) -> None:
        attempts.add(event.payload)
        if event.payload == "bad":
            raise ValueError("cannot handle it")

    events.serve(registry)
    publisher = events.publisher("topic")
    publisher.publish("a", "bad")
    publisher.publish("a", "good")
    # a requeued event would come back before "good"
    assert attempts.wait(2) == ["bad", "good"]
    assert failed.seen.wait(10)
    record = failed.records[0]
    assert record.levelname == "ERROR" and record.exc_info is not None
    assert "cannot handle it" in str(record.exc_info[1])


def test_async_def_handlers(events: Events, log_waiter: Callable[[str], LogWaiter]) -> None:
    failed = log_waiter("event handler")
    recorder = Recorder()
    registry = Registry()

    @registry.subscribe(events.exchange, "#")
    async def record(event: Event) -> None:
        await asyncio.sleep(0)  # a real coroutine, run to its end
        if event.payload == "bad":
            raise ValueError("cannot handle it")
        recorder.add((event.routing_key, event.payload))

    events.serve(registry)
    publisher = events.publisher("topic")
    for payload in ("a", "bad", "b"):
        publisher.publish("k", payload)
    # in order, one at a time; the failure is logged and does not stop the next one
    assert recorder.wait(2) == [("k", "a"), ("k", "b")]
    assert failed.seen.wait(10)
    assert "cannot handle it" in str(failed.records[0].exc_info[1])  # type: ignore[index]


def test_a_malformed_event_is_rejected(events: Events, log_waiter: Callable[[str], LogWaiter]) -> None:
    rejected = log_waiter("rejected a malformed event")
    recorder = Recorder()
    registry = Registry()
    recording(registry, recorder, events.exchange)
    events.serve(registry)
    events.publish_raw("topic", "a", "<not-json/>", "application/xml")
    events.publish_raw("topic", "a", "{not json", "application/json")
    events.publisher("topic").publish("a", {"fine": True})
    assert recorder.wait(1) == [("a", {"fine": True})]
    assert rejected.seen.wait(10)
    assert len(rejected.records) == 2
    assert all(record.levelname == "WARNING" for record in rejected.records)


def test_events_are_counted_in_metrics(events: Events) -> None:
    reg = CollectorRegistry()
    metrics.enable(reg)
    try:
        handled = Recorder()
        registry = Registry()

        @registry.subscribe(events.exchange, "#", name="counted")
        def counted(event: Event) -> None:
            handled.add(event.payload)
            if event.payload == "bad":
                raise ValueError("cannot handle it")

        events.serve(registry)
        events.publish_raw("topic", "a", "<not/>", "application/xml")
        publisher = events.publisher("topic")
        for payload in ("good", "bad", "good"):
            publisher.publish("a", payload)
        assert handled.wait(3) == ["good", "bad", "good"]
        labels = {"exchange": events.exchange, "subscription": "counted"}
        outcomes = {"ok": 2.0, "error": 1.0, "malformed": 1.0}
        deadline = time.monotonic() + 10  # counted just after the handler returned
        while any(
            reg.get_sample_value("kombu_rpc_events_handled_total", {**labels, "outcome": o}) != n
            for o, n in outcomes.items()
        ):
            assert time.monotonic() < deadline, [
                reg.get_sample_value("kombu_rpc_events_handled_total", {**labels, "outcome": o})
                for o in outcomes
            ]
            time.sleep(0.01)
        published = reg.get_sample_value("kombu_rpc_events_published_total", {"exchange": events.exchange})
        assert published == 3
    finally:
        metrics.disable()


def test_a_plain_publishers_events_arrive_as_text(events: Events) -> None:
    recorder = Recorder()
    registry = Registry()
    recording(registry, recorder, events.exchange)
    events.serve(registry)
    # (text without a content type, as the tutorials' pika programs send it: see
    # tests/acceptance/test_examples_events.py)
    publisher = events.publisher_plain("topic")
    publisher.publish("a", "info: Hello World!")
    publisher.publish("b", "42")  # text, not JSON-decoded
    assert recorder.wait(2) == [("a", "info: Hello World!"), ("b", "42")]


def test_a_group_keeps_events_while_no_server_runs(events: Events) -> None:
    recorder = Recorder()
    registry = Registry()
    recording(registry, recorder, events.exchange, "jobs.*", group="workers")
    with events.server(registry).running():
        pass  # the group's durable queue is declared; its server stopped when this returns
    publisher = events.publisher("topic")
    for n in range(3):
        publisher.publish("jobs.new", n)
    events.serve(registry)
    assert [payload for _, payload in recorder.wait(3)] == [0, 1, 2]


def test_events_and_calls_on_a_server_with_a_pool(events: Events) -> None:
    recorder = Recorder()
    registry = Registry()
    recording(registry, recorder, events.exchange)

    @registry.remote
    def echo(value: Any) -> Any:
        return value

    events.serve(registry, concurrency=4)
    events.publisher("topic").publish("a", 1)
    with RPCProxy(events.broker_url, queue=events.queue, timeout=10) as proxy:
        assert proxy.echo("call") == "call"
    assert recorder.wait(1) == [("a", 1)]


def test_a_group_on_a_fanout_exchange_is_warned_about_on_redis(
    events: Events, log_waiter: Callable[[str], LogWaiter]
) -> None:
    warned = log_waiter("on Redis a fanout exchange reaches every server")
    registry = Registry()
    recording(registry, Recorder(), events.exchange, type="fanout", group="workers")
    events.serve(registry)
    assert bool(warned.records) == events.broker_url.startswith("redis")
