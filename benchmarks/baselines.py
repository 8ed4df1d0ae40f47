"""The baselines kombu_rpc is measured against, written from scratch for this suite.

* :class:`RawKombu`: the smallest request/reply loop on plain kombu, on every broker.
  A server thread owns one connection: a Consumer on the request queue, a Producer for
  replies, ack after replying. A client owns one connection: a Producer that sends
  requests with ``reply_to`` and ``correlation_id``, a Consumer on a private reply
  queue, and ``drain_events`` until the matching reply came. JSON bodies. It is the
  floor for any kombu-based RPC library. ``RawKombu(..., confirms=True)`` (AMQP,
  ``raw_kombu_confirms``) is the same loop with kombu_rpc's guarantees as plain kombu
  gives them: every publish waits for its publisher confirm (kombu's
  ``confirm_publish`` transport option), so the server acks a request only after the
  broker confirmed its reply, and a request counts as sent once confirmed.
* :class:`PikaTutorial`: the RabbitMQ tutorial-6 client and server written with pika
  (AMQP only): ``basic_qos(prefetch_count=1)``, ``basic_consume``, compute, publish to
  ``reply_to`` with the ``correlation_id``, ``basic_ack``; the client declares an
  exclusive server-named reply queue and runs ``process_data_events`` until its reply
  arrives. pika is imported only when this baseline runs.

Both speak the same JSON bodies: ``{"method": name, "args": [...]}`` for a request and
``{"result": value}`` for a reply, and serve the same :class:`~benchmarks.workload.Workload`.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import perf_counter
from typing import Any

from kombu import Connection, Consumer, Producer, Queue
from kombu.message import Message

from .brokers import Broker, unique_queue
from .implementations import Client, Implementation
from .workload import Workload

#: The method a client sends to make a baseline server leave its loop.
STOP = "_stop"
#: Longest a baseline server blocks in one wait, so it notices a stop in time.
SERVER_WAIT = 1.0
#: Measured window of plain kombu's polling memory:// transport: a call takes about 1 s.
POLLING_WINDOW = 2.0


def _dispatch(handlers: dict[str, Callable[..., Any]], body: Any) -> tuple[str, Any]:
    """Run the request ``body``; returns its method name and result."""
    method = body["method"]
    if method == STOP:
        return method, None
    return method, handlers[method](*body["args"])


def _longer_than(values: list[float], size: int) -> Callable[[], bool]:
    """A test for "``values`` grew past ``size``" (a reply arrived)."""
    return lambda: len(values) > size


def _pipeline(
    send: Callable[[], object],
    wait: Callable[[Callable[[], bool]], None],
    n: int,
    k: int,
    deadline: float,
    latencies: list[float],
) -> int:
    """Keep ``k`` requests in flight until ``n`` were sent (or ``deadline`` passed) and
    all came back. A reply counts when its latency lands in ``latencies``, wherever it
    was handled: py-amqp also delivers messages while it publishes."""
    base = len(latencies)
    sent = 0
    while True:
        while sent - (len(latencies) - base) < k and sent < n and (sent == 0 or perf_counter() < deadline):
            send()
            sent += 1
        done = len(latencies) - base
        if done >= sent:
            if sent >= n or perf_counter() >= deadline:
                return sent
            continue
        wait(_longer_than(latencies, base + done))


class _BaselineServer(threading.Thread):
    """A server thread that reports once it consumes, or why it could not start."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.stopped = False

    def wait_ready(self, timeout: float) -> None:
        """Wait until the server consumes; raise what stopped it from starting."""
        if not self.ready.wait(timeout):
            raise TimeoutError(f"{self.name} did not start within {timeout}s")
        if self.error is not None:
            raise RuntimeError(f"{self.name} failed to start: {self.error!r}") from self.error


# -- raw kombu ------------------------------------------------------------------------


class RawKombuServer(_BaselineServer):
    """One connection: consume the request queue, reply with a Producer, then ack."""

    def __init__(
        self,
        url: str,
        queue: str,
        handlers: dict[str, Callable[..., Any]],
        prefetch: int,
        transport_options: dict[str, Any],
    ) -> None:
        super().__init__(f"raw-kombu-server-{queue}")
        self.url = url
        self.queue = queue
        self.handlers = handlers
        self.prefetch = prefetch
        self.transport_options = transport_options

    def run(self) -> None:
        """Serve until a :data:`STOP` request arrives."""
        try:
            with Connection(self.url, transport_options=self.transport_options) as conn:
                channel = conn.channel()
                producer = Producer(channel, serializer="json")

                received: list[tuple[Any, Message]] = []

                def on_request(body: Any, message: Message) -> None:
                    # Handled after drain_events returns: with confirms, a publish waits
                    # for its confirm, and py-amqp would deliver the next request into
                    # this callback while it waits (handlers nested up to the prefetch).
                    received.append((body, message))

                def handle(body: Any, message: Message) -> None:
                    method, result = _dispatch(self.handlers, body)
                    props = message.properties
                    if props.get("reply_to"):
                        producer.publish(
                            {"result": result},
                            exchange="",
                            routing_key=props["reply_to"],
                            correlation_id=props["correlation_id"],
                        )
                    message.ack()
                    if method == STOP:
                        self.stopped = True

                queue = Queue(self.queue, routing_key=self.queue)
                with Consumer(
                    channel, [queue], callbacks=[on_request], accept=["json"], prefetch_count=self.prefetch
                ):
                    self.ready.set()
                    while not self.stopped:
                        try:
                            conn.drain_events(timeout=SERVER_WAIT)
                        except TimeoutError:
                            pass
                        while received:
                            handle(*received.pop(0))
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.ready.set()


class RawKombuClient:
    """One connection: a Producer for requests, a Consumer on a private reply queue."""

    def __init__(self, url: str, queue: str, transport_options: dict[str, Any], call_timeout: float) -> None:
        self.queue = queue
        self.call_timeout = call_timeout
        self.conn = Connection(url, transport_options=transport_options)
        self.conn.ensure_connection(max_retries=3)
        channel = self.conn.channel()
        reply_name = unique_queue("reply")
        self.reply_queue = Queue(reply_name, routing_key=reply_name, exclusive=True, auto_delete=True)(
            channel
        )
        self.reply_queue.declare()
        self.producer = Producer(channel, serializer="json")
        self.consumer = Consumer(
            channel, [self.reply_queue], callbacks=[self._on_reply], accept=["json"], no_ack=True
        )
        self.consumer.consume()
        self._started: dict[str, float] = {}
        self._results: dict[str, Any] = {}
        self._latencies: list[float] | None = None

    def _on_reply(self, body: Any, message: Message) -> None:
        correlation_id = message.properties.get("correlation_id")
        started = self._started.pop(correlation_id, None)
        if started is None:
            return  # not ours, or late
        if self._latencies is not None:
            self._latencies.append(perf_counter() - started)
        else:
            self._results[correlation_id] = body["result"]

    def _send(self, method: str, args: tuple[Any, ...], reply: bool) -> str:
        correlation_id = uuid.uuid4().hex
        if reply:
            self._started[correlation_id] = perf_counter()
            self.producer.publish(
                {"method": method, "args": list(args)},
                exchange="",
                routing_key=self.queue,
                reply_to=self.reply_queue.name,
                correlation_id=correlation_id,
            )
        else:
            self.producer.publish({"method": method, "args": list(args)}, exchange="", routing_key=self.queue)
        return correlation_id

    def _drain_until(self, done: Callable[[], bool]) -> None:
        deadline = perf_counter() + self.call_timeout
        while not done():
            remaining = deadline - perf_counter()
            if remaining <= 0:
                raise TimeoutError(f"no reply within {self.call_timeout}s")
            try:
                self.conn.drain_events(timeout=remaining)
            except TimeoutError:
                pass

    def call(self, method: str, *args: Any) -> Any:
        """Publish one request and drain until its reply arrived."""
        correlation_id = self._send(method, args, reply=True)
        self._drain_until(lambda: correlation_id in self._results)
        return self._results.pop(correlation_id)

    def cast(self, method: str, *args: Any) -> None:
        """Publish one request without ``reply_to``."""
        self._send(method, args, reply=False)

    def pipeline(
        self, method: str, args: tuple[Any, ...], n: int, k: int, deadline: float, latencies: list[float]
    ) -> int:
        """Publish ``k`` requests, then one more for each reply drained."""
        self._latencies = latencies
        try:
            return _pipeline(
                lambda: self._send(method, args, reply=True), self._drain_until, n, k, deadline, latencies
            )
        finally:
            self._latencies = None

    def close(self) -> None:
        """Delete the reply queue (Redis, memory) and close the connection."""
        try:
            self.consumer.cancel()
            if self.conn.transport.driver_type != "amqp":  # AMQP drops the exclusive queue itself
                self.reply_queue.purge()
                self.reply_queue.delete()
        finally:
            self.conn.release()


class RawKombu(Implementation):
    """The raw-kombu baseline; on memory://, plain kombu's polling transport.

    Args:
        busy_poll: memory:// only: ``polling_interval=0`` instead of kombu's default of
            1 s, so an empty queue is polled again at once (fast, but it spins a core).
        confirms: AMQP only: wait for a publisher confirm after every publish.
    """

    def __init__(
        self, broker: Broker, call_timeout: float, busy_poll: bool = False, confirms: bool = False
    ) -> None:
        super().__init__(broker, call_timeout)
        if confirms and broker.name != "amqp":
            raise ValueError("publisher confirms are an AMQP feature")
        self.transport_options: dict[str, Any] = {"polling_interval": 0} if busy_poll else {}
        self.name = "raw_kombu_busypoll" if busy_poll else "raw_kombu"
        if confirms:
            self.transport_options["confirm_publish"] = True
            self.name = "raw_kombu_confirms"
            self.note = (
                "raw_kombu_confirms: the raw kombu loop with publisher confirms on every publish "
                "(the server acks after its reply is confirmed), as kombu_rpc does by default"
            )
        if broker.name == "memory" and busy_poll:
            self.note = (
                "raw_kombu_busypoll: plain kombu memory:// with polling_interval=0 (spins a core while idle)"
            )
        elif broker.name == "memory":
            self.note = (
                "raw_kombu on memory:// is plain kombu, which polls an empty queue every 1 s "
                f"(about one call per second, so its windows are capped at {POLLING_WINDOW:g} s)"
            )
            self.window_cap = POLLING_WINDOW

    @contextmanager
    def server(self, workload: Workload, queue: str, concurrency: int) -> Iterator[None]:
        """Serve in a thread with prefetch ``concurrency`` (one call at a time, like the
        tutorial: the prefetch is there to match kombu_rpc's broker-side flow control)."""
        server = RawKombuServer(
            self.broker.url, queue, workload.handlers(), concurrency, self.transport_options
        )
        server.start()
        with _stopping(server, lambda: self.client(queue), self.call_timeout):
            yield

    def client(self, queue: str) -> Client:
        """A client with a connection of its own."""
        return RawKombuClient(self.broker.url, queue, self.transport_options, self.call_timeout)


@contextmanager
def _stopping(server: _BaselineServer, new_client: Callable[[], Client], timeout: float) -> Iterator[None]:
    """Wait until the started ``server`` consumes; on exit, send it :data:`STOP` through
    a client of its own and wait for it to end."""
    try:
        server.wait_ready(timeout)
        yield
    finally:
        if server.is_alive():
            try:
                client = new_client()
                try:
                    client.cast(STOP)
                finally:
                    client.close()
            except Exception:
                pass  # the server is a daemon thread; it dies with the process
            server.join(timeout)


# -- pika (RabbitMQ tutorial 6) -----------------------------------------------------------


def _pika() -> Any:
    """Import pika on first use, so the suite runs without it unless this baseline runs."""
    import pika  # type: ignore[import-untyped]

    return pika


def pika_parameters(url: str) -> Any:
    """pika connection parameters for a kombu AMQP URL (host, port, user, vhost)."""
    pika = _pika()
    conn = Connection(url)
    return pika.ConnectionParameters(
        host=conn.hostname or "localhost",
        port=conn.port or 5672,
        virtual_host=conn.virtual_host or "/",
        credentials=pika.PlainCredentials(conn.userid or "guest", conn.password or "guest"),
    )


class PikaServer(_BaselineServer):
    """The tutorial's RPC server, in a thread with its own BlockingConnection."""

    def __init__(self, parameters: Any, queue: str, handlers: dict[str, Callable[..., Any]]) -> None:
        super().__init__(f"pika-server-{queue}")
        self.parameters = parameters
        self.queue = queue
        self.handlers = handlers

    def run(self) -> None:
        """Consume until a :data:`STOP` request arrives."""
        pika = _pika()
        try:
            connection = pika.BlockingConnection(self.parameters)
            try:
                channel = connection.channel()
                channel.queue_declare(queue=self.queue)
                channel.basic_qos(prefetch_count=1)

                def on_request(ch: Any, method: Any, props: Any, body: bytes) -> None:
                    name, result = _dispatch(self.handlers, json.loads(body))
                    if props.reply_to:
                        ch.basic_publish(
                            exchange="",
                            routing_key=props.reply_to,
                            properties=pika.BasicProperties(
                                correlation_id=props.correlation_id, content_type="application/json"
                            ),
                            body=json.dumps({"result": result}),
                        )
                    ch.basic_ack(delivery_tag=method.delivery_tag)
                    if name == STOP:
                        ch.stop_consuming()

                channel.basic_consume(queue=self.queue, on_message_callback=on_request)
                self.ready.set()
                channel.start_consuming()
                channel.queue_delete(queue=self.queue)
            finally:
                connection.close()
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.ready.set()


class PikaClient:
    """The tutorial's RPC client: an exclusive server-named reply queue, one connection."""

    def __init__(self, parameters: Any, queue: str, call_timeout: float) -> None:
        self.pika = _pika()
        self.queue = queue
        self.call_timeout = call_timeout
        self.connection = self.pika.BlockingConnection(parameters)
        self.channel = self.connection.channel()
        declared = self.channel.queue_declare(queue="", exclusive=True)
        self.callback_queue: str = declared.method.queue
        self.channel.basic_consume(
            queue=self.callback_queue, on_message_callback=self._on_response, auto_ack=True
        )
        self._started: dict[str, float] = {}
        self._results: dict[str, Any] = {}
        self._latencies: list[float] | None = None

    def _on_response(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        started = self._started.pop(props.correlation_id, None)
        if started is None:
            return
        if self._latencies is not None:
            self._latencies.append(perf_counter() - started)
        else:
            self._results[props.correlation_id] = json.loads(body)["result"]

    def _send(self, method: str, args: tuple[Any, ...], reply: bool) -> str:
        correlation_id = str(uuid.uuid4())
        properties = self.pika.BasicProperties(content_type="application/json")
        if reply:
            properties.reply_to = self.callback_queue
            properties.correlation_id = correlation_id
            self._started[correlation_id] = perf_counter()
        self.channel.basic_publish(
            exchange="",
            routing_key=self.queue,
            properties=properties,
            body=json.dumps({"method": method, "args": list(args)}),
        )
        return correlation_id

    def _process_until(self, done: Callable[[], bool]) -> None:
        deadline = perf_counter() + self.call_timeout
        while not done():
            remaining = deadline - perf_counter()
            if remaining <= 0:
                raise TimeoutError(f"no reply within {self.call_timeout}s")
            self.connection.process_data_events(time_limit=remaining)

    def call(self, method: str, *args: Any) -> Any:
        """Publish one request and process events until its reply arrived."""
        correlation_id = self._send(method, args, reply=True)
        self._process_until(lambda: correlation_id in self._results)
        return self._results.pop(correlation_id)

    def cast(self, method: str, *args: Any) -> None:
        """Publish one request without ``reply_to``."""
        self._send(method, args, reply=False)

    def pipeline(
        self, method: str, args: tuple[Any, ...], n: int, k: int, deadline: float, latencies: list[float]
    ) -> int:
        """Publish ``k`` requests, then one more for each reply processed."""
        self._latencies = latencies
        try:
            return _pipeline(
                lambda: self._send(method, args, reply=True), self._process_until, n, k, deadline, latencies
            )
        finally:
            self._latencies = None

    def close(self) -> None:
        """Close the connection (RabbitMQ drops the exclusive reply queue with it)."""
        self.connection.close()


class PikaTutorial(Implementation):
    """The pika tutorial-6 baseline (AMQP only); the server always has prefetch 1."""

    name = "pika"
    note = "pika: RabbitMQ tutorial 6 (server prefetch_count=1, no publisher confirms)"

    @contextmanager
    def server(self, workload: Workload, queue: str, concurrency: int) -> Iterator[None]:
        """Serve with the tutorial's server; ``concurrency`` is ignored (prefetch 1)."""
        server = PikaServer(pika_parameters(self.broker.url), queue, workload.handlers())
        server.start()
        with _stopping(server, lambda: self.client(queue), self.call_timeout):
            yield

    def client(self, queue: str) -> Client:
        """A tutorial client with a connection of its own."""
        return PikaClient(pika_parameters(self.broker.url), queue, self.call_timeout)
