"""A broker URL list whose first URL is dead: kombu fails over to the next one, and the
connection stays on kombu_rpc's transport (kombu's ``Connection.switch`` would put it
on kombu's stock one).

The dead URL is a loopback port bound by the test and never listened on (connecting is
refused at once); the live one is a shared broker, which only sees connections of the
test's own.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
from kombu import Connection

from kombu_rpc import RPCProxy
from kombu_rpc._transports import Kind, PinnedConnection, kind
from kombu_rpc._transports import amqp as fast_amqp
from kombu_rpc._transports import redis as fast_redis
from kombu_rpc.connection import connect
from kombu_rpc.testing import running_server, unique_queue_name

pytestmark = pytest.mark.timeout(60)

#: Fail over at once (kombu sleeps only after a whole round of the list).
RETRIES = {"max_retries": 4, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test (bound, no listener)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = netloc[-1].rsplit(":", 1)[0] + f":{port}"
    return urlunsplit(parts._replace(netloc="@".join([*netloc[:-1], host])))


def fast_transport(url: str) -> type:
    return fast_amqp.Transport if url.startswith("amqp") else fast_redis.Transport


def check_on(conn: Connection, url: str) -> None:
    """``conn`` is connected to the broker of ``url``, on kombu_rpc's transport."""
    assert conn.connected
    assert conn.port == urlsplit(url).port
    assert conn.transport_cls is fast_transport(url)
    assert type(conn.transport) is fast_transport(url)
    assert kind(conn) is (Kind.AMQP if url.startswith("amqp") else Kind.REDIS)


def test_a_dead_first_url_fails_over_to_the_next_on_kombu_rpcs_transport(
    real_broker_url: str, dead_port: int
) -> None:
    dead = with_port(real_broker_url, dead_port)
    conn = connect(Connection(f"{dead};{real_broker_url}"))  # a Connection keeps its order
    assert isinstance(conn, PinnedConnection) and conn.port == dead_port
    early_clone = conn.clone()  # before any failover
    try:
        conn.ensure_connection(**RETRIES)
        check_on(conn, real_broker_url)
        with conn.clone() as clone:  # a clone of the connection that failed over
            clone.ensure_connection(**RETRIES)
            check_on(clone, real_broker_url)
        early_clone.ensure_connection(**RETRIES)  # fails over on its own
        check_on(early_clone, real_broker_url)
    finally:
        early_clone.release()
        conn.release()


def test_a_url_list_string_connects_on_kombu_rpcs_transport_whichever_url_comes_first(
    real_broker_url: str, dead_port: int
) -> None:
    dead = with_port(real_broker_url, dead_port)
    both = {dead_port, urlsplit(real_broker_url).port}
    started = set()
    for _ in range(48):  # until both orders came up: 1 in 2**47 to miss (12 missed once in CI)
        with connect(f"{dead};{real_broker_url}") as conn:
            started.add(conn.port)
            conn.ensure_connection(**RETRIES)
            check_on(conn, real_broker_url)
        if started == both:
            break
    assert started == both


def test_calls_work_when_the_first_url_of_the_list_is_dead(real_broker_url: str, dead_port: int) -> None:
    broker = Connection(f"{with_port(real_broker_url, dead_port)};{real_broker_url}")
    queue = unique_queue_name("test.url_list")
    with running_server({"add": lambda a, b: a + b}, broker, queue, retry_policy={"interval_start": 0}):
        with RPCProxy(broker, queue=queue, timeout=10, retry_policy={"interval_start": 0}) as proxy:
            assert proxy.add(1, 2) == 3
