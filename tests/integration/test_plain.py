"""The Plain codec: the RabbitMQ tutorial 6 wire format, both ways.

The pika programs below are written in the tutorial's style, unchanged but for taking
the queue name from the command line (so that tests do not share ``rpc_queue``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import pytest
from kombu import Connection

from kombu_rpc import (
    ConfigurationError,
    MalformedRequest,
    Plain,
    Registry,
    RemoteError,
    RPCProxy,
    RPCServer,
    SerializationError,
)
from kombu_rpc.testing import running_server

from .conftest import RawClient

pytestmark = pytest.mark.timeout(60)

PIKA_SERVER = textwrap.dedent("""
    import sys
    import pika

    connection = pika.BlockingConnection(pika.ConnectionParameters(host="127.0.0.1"))
    channel = connection.channel()
    channel.queue_declare(queue=sys.argv[1])

    def fib(n):
        if n == 0:
            return 0
        elif n == 1:
            return 1
        else:
            return fib(n - 1) + fib(n - 2)

    def on_request(ch, method, props, body):
        n = int(body)
        print(f" [.] fib({n})", flush=True)
        response = fib(n)
        ch.basic_publish(exchange="", routing_key=props.reply_to,
                         properties=pika.BasicProperties(correlation_id=props.correlation_id),
                         body=str(response))
        ch.basic_ack(delivery_tag=method.delivery_tag)

    channel.basic_qos(prefetch_count=1)
    channel.basic_consume(queue=sys.argv[1], on_message_callback=on_request)
    print(" [x] Awaiting RPC requests", flush=True)
    try:
        channel.start_consuming()
    except KeyboardInterrupt:
        connection.close()
""")

PIKA_CLIENT = textwrap.dedent("""
    import sys
    import uuid
    import pika

    class FibonacciRpcClient:
        def __init__(self):
            self.connection = pika.BlockingConnection(pika.ConnectionParameters(host="127.0.0.1"))
            self.channel = self.connection.channel()
            result = self.channel.queue_declare(queue="", exclusive=True)
            self.callback_queue = result.method.queue
            self.channel.basic_consume(queue=self.callback_queue,
                                       on_message_callback=self.on_response, auto_ack=True)
            self.response = None
            self.corr_id = None

        def on_response(self, ch, method, props, body):
            if self.corr_id == props.correlation_id:
                self.response = body

        def call(self, n):
            self.response = None
            self.corr_id = str(uuid.uuid4())
            self.channel.basic_publish(exchange="", routing_key=sys.argv[1],
                                       properties=pika.BasicProperties(reply_to=self.callback_queue,
                                                                       correlation_id=self.corr_id),
                                       body=str(n))
            while self.response is None:
                self.connection.process_data_events(time_limit=None)
            return int(self.response)

    fibonacci_rpc = FibonacciRpcClient()
    for n in (30, 10):
        print(f" [x] Requesting fib({n})", flush=True)
        response = fibonacci_rpc.call(n)
        print(f" [.] Got {response}", flush=True)
""")


def fib(n: int) -> int:
    if n < 0:
        raise ValueError(f"fib({n}): n must be >= 0")
    return n if n < 2 else fib(n - 1) + fib(n - 2)


@pytest.fixture
def fib_registry() -> Registry:
    registry = Registry()
    registry.register(fib)
    return registry


@pytest.fixture
def pika_server(amqp_url: str, queue_name: str) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(
        [sys.executable, "-c", PIKA_SERVER, queue_name], stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        try:
            assert process.stdout.readline() == " [x] Awaiting RPC requests\n"
            yield process
        finally:
            process.kill()
            with Connection(amqp_url) as conn:
                conn.default_channel.queue_delete(queue_name)


def test_a_tutorial_pika_client_calls_a_kombu_rpc_server(
    amqp_url: str, queue_name: str, fib_registry: Registry
) -> None:
    server = RPCServer(amqp_url, registry=fib_registry, queue=queue_name, codec=Plain("fib"))
    try:
        with server.running():
            client = subprocess.run(
                [sys.executable, "-c", PIKA_CLIENT, queue_name], capture_output=True, text=True, timeout=30
            )
    finally:
        with Connection(amqp_url) as conn:
            conn.default_channel.queue_delete(queue_name)
    assert client.returncode == 0, client.stderr
    assert client.stdout.splitlines() == [
        " [x] Requesting fib(30)",
        " [.] Got 832040",
        " [x] Requesting fib(10)",
        " [.] Got 55",
    ]


def test_a_kombu_rpc_proxy_calls_a_tutorial_pika_server(
    amqp_url: str, queue_name: str, pika_server: subprocess.Popen[str]
) -> None:
    assert pika_server.stdout is not None
    with RPCProxy(amqp_url, queue=queue_name, timeout=20, codec=Plain()) as proxy:
        assert proxy.fib(30) == 832040
        assert pika_server.stdout.readline() == " [.] fib(30)\n"
        futures = [proxy.fib.call_async(n) for n in range(10)]
        assert [f.result() for f in futures] == [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]


def test_plain_between_kombu_rpc_peers_on_every_broker(
    serve: Callable[..., RPCServer], proxies: Callable[..., RPCProxy], fib_registry: Registry
) -> None:
    serve(registry=fib_registry, codec=Plain("fib"))
    proxy = proxies(codec=Plain())
    assert proxy.fib(20) == 6765
    assert proxy.anything(10) == 55  # the server runs its one method whatever the name
    # A failure travels in a header; the body is its message, for the tutorial's programs
    with pytest.raises(RemoteError, match="n must be >= 0") as info:
        proxy.fib(-1)
    assert info.value.exc_type == "ValueError"
    # Text that is not JSON arrives as text
    with pytest.raises(RemoteError, match="'<' not supported between instances of 'str' and 'int'"):
        proxy.fib("thirty")


def test_a_format_mismatch_is_an_error_that_names_plain(
    broker_url: str,
    serve: Callable[..., RPCServer],
    proxies: Callable[..., RPCProxy],
    fib_registry: Registry,
    queue_name: str,
) -> None:
    # A plain proxy calling a server of kombu_rpc's envelope: the server's refusal
    # comes back as an error, not as the result
    serve(registry=fib_registry)
    with pytest.raises(RemoteError) as refused:
        proxies(codec=Plain()).fib(10)
    assert isinstance(refused.value, MalformedRequest), refused.value
    # An envelope proxy calling a plain server: the reply cannot be read, and says why
    plain_queue = f"{queue_name}.plain"
    with running_server(fib_registry, broker_url, plain_queue, codec=Plain("fib")):  # deletes its queue
        with pytest.raises(
            RemoteError, match=r"plain format: call it with RPCProxy\(\.\.\., codec=Plain\(\)\)"
        ):
            proxies(queue=plain_queue).fib(10)


def test_plain_replies_and_refusals_are_text(
    serve: Callable[..., RPCServer], raw: RawClient, fib_registry: Registry
) -> None:
    serve(registry=fib_registry, codec=Plain("fib"))
    cid = raw.send("12", content_type="text/plain")
    message = raw.replies.get(block=True, timeout=10)
    assert message.properties["correlation_id"] == cid
    assert message.body in (b"144", "144")
    # A body that is not UTF-8 is refused with a MalformedRequest, in the header
    cid = raw.send(b"\xff\xfe", content_type="application/octet-stream")
    message = raw.replies.get(block=True, timeout=10)
    assert message.properties["correlation_id"] == cid
    assert message.headers["x-rpc-error"]["type"] == "MalformedRequest"


def test_plain_carries_exactly_one_argument() -> None:
    with RPCProxy("memory://", codec=Plain()) as proxy:
        for call in (lambda: proxy.fib(), lambda: proxy.fib(1, 2), lambda: proxy.fib(n=1)):
            with pytest.raises(SerializationError, match="exactly one positional argument"):
                call()


@pytest.mark.parametrize("codec", ["plain", object()])
def test_the_codec_must_be_a_codec(codec: object) -> None:
    with pytest.raises(ConfigurationError, match="codec"):
        RPCServer("memory://", codec=codec)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="codec"):
        RPCProxy("memory://", codec=codec)  # type: ignore[arg-type]


def test_a_plain_server_method_must_be_a_remote_name() -> None:
    with pytest.raises(ConfigurationError, match="remote name"):
        Plain("not a name")
    assert issubclass(MalformedRequest, RemoteError)
