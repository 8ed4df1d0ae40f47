"""kombu_rpc._transports.redis on a real Redis: one command client per channel, and
kombu's keys, ack emulation, fanout and reconnection unchanged (plain kombu processes
share the queues)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from time import monotonic
from typing import Any

import kombu
import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis

from kombu_rpc import RPCProxy, RPCServer, RPCTimeout, _consumer
from kombu_rpc._transports import redis as redis_transport
from kombu_rpc.connection import connect, safe_uri
from kombu_rpc.testing import make_registry, unique_queue_name
from kombu_rpc.topology import new_id

from ..brokers import PrivateRedis

pytestmark = pytest.mark.timeout(30)
#: Tests that find their own Redis connections by name: kombu passes ``client_name`` on
#: to redis-py from 5.6 (the proxy's reconnect is tested on every kombu in test_redis_link).
needs_client_name = pytest.mark.skipif(
    kombu.VERSION < (5, 6), reason="kombu < 5.6 does not name its Redis connections (client_name)"
)


@pytest.fixture
def redis_url(real_broker_url: str) -> str:
    if not real_broker_url.startswith("redis"):
        pytest.skip("the Redis transport")
    return real_broker_url


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def keys() -> dict[str, str]:
    """Ack-emulation keys of this test's own, so no other test's deliveries mix in."""
    tag = new_id()
    return {
        "unacked_key": f"test.unacked.{tag}",
        "unacked_index_key": f"test.unacked_index.{tag}",
        "unacked_mutex_key": f"test.unacked_mutex.{tag}",
    }


@pytest.fixture
def queue(redis_url: str) -> Iterator[Queue]:
    name = f"test.redis-transport.{new_id()}"
    yield Queue(name, routing_key=name)
    with Connection(redis_url) as conn:
        Queue(name, routing_key=name)(conn.default_channel).delete()


@pytest.fixture
def client_builds(monkeypatch: pytest.MonkeyPatch) -> Counter[int]:
    """How many command clients (not poller clients) each channel built, by channel id."""
    builds: Counter[int] = Counter()
    create = kombu_redis.Channel._create_client

    def counting(self: Any, asynchronous: bool = False) -> Any:
        if not asynchronous:
            builds[id(self)] += 1
        return create(self, asynchronous)

    monkeypatch.setattr(kombu_redis.Channel, "_create_client", counting)
    return builds


def ours(url: str, **options: Any) -> Connection:
    conn = connect(url)
    conn.transport_options.update(options)
    return conn


def plain(url: str, **options: Any) -> Connection:
    return Connection(url, transport_options=options)


def take(conn: Connection, queue: Queue, count: int) -> list[Any]:
    """Take ``count`` messages from ``queue``, acking each; their bodies."""
    with conn.SimpleQueue(queue) as simple:
        bodies = []
        for _ in range(count):
            message = simple.get(timeout=5)
            bodies.append(message.payload)
            message.ack()
        return bodies


def roundtrip(conn: Connection, queue: Queue, count: int) -> list[Any]:
    """Publish ``count`` messages to ``queue`` and take them back, acking each."""
    with conn.SimpleQueue(queue) as simple:
        for i in range(count):
            simple.put(i)
    return take(conn, queue, count)


def test_connect_applies_it_to_redis_only() -> None:
    conn = connect("redis://127.0.0.1:6379/3")
    assert conn.transport_cls is redis_transport.Transport
    assert conn.transport_options["socket_timeout"] > 0  # the defaults still apply
    assert safe_uri(conn) == "redis://127.0.0.1:6379/3"  # no password: nothing masked
    given = connect(Connection(transport=kombu_redis.Transport, hostname="127.0.0.1"))
    assert given.transport_cls is redis_transport.Transport
    # TLS and Sentinel are kombu's own
    assert connect("rediss://127.0.0.1:6380/0").transport_cls == "rediss"
    assert connect("sentinel://127.0.0.1:26379").transport_cls == "sentinel"


def test_a_channel_builds_one_command_client(
    redis_url: str, queue: Queue, client_builds: Counter[int]
) -> None:
    with ours(redis_url) as conn:
        assert roundtrip(conn, queue, 50) == list(range(50))
    # one channel published, consumed and acked 50 messages (150 commands) on one client
    assert list(client_builds.values()) == [1]


def test_plain_kombu_builds_a_client_per_command(
    redis_url: str, queue: Queue, client_builds: Counter[int]
) -> None:
    """The control for the test above: what kombu does, and what the counter sees."""
    with plain(redis_url) as conn:
        assert roundtrip(conn, queue, 50) == list(range(50))
    assert sum(client_builds.values()) >= 150


def test_a_replaced_pool_gets_a_client_of_its_own(redis_url: str, queue: Queue) -> None:
    with ours(redis_url) as conn:
        channel = conn.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as again:
            assert first is again and first.connection_pool is channel.pool
        # the pool is kombu's, with the transport options
        assert (
            first.connection_pool.connection_kwargs["socket_timeout"]
            == conn.transport_options["socket_timeout"]
        )
        channel._disconnect_pools()  # as after a fork
        with channel.conn_or_acquire() as second:
            assert second is not first and second.connection_pool is channel.pool
        given = object()
        with channel.conn_or_acquire(given) as lent:
            assert lent is given
        assert roundtrip(conn, queue, 3) == [0, 1, 2]


def test_plain_kombu_and_ours_share_a_queue(redis_url: str, queue: Queue) -> None:
    with ours(redis_url) as mine, plain(redis_url) as theirs:
        with mine.SimpleQueue(queue) as ours_q, theirs.SimpleQueue(queue) as theirs_q:
            ours_q.put({"from": "ours"}, priority=3)
            message = theirs_q.get(timeout=5)
            assert message.payload == {"from": "ours"}
            message.ack()
            theirs_q.put({"from": "theirs"})
            message = ours_q.get(timeout=5)
            assert message.payload == {"from": "theirs"}
            message.ack()


def test_a_global_key_prefix_is_kept(redis_url: str, queue: Queue, admin: redis.Redis) -> None:
    prefix = f"test.prefix.{new_id()}:"
    try:
        with ours(redis_url, global_keyprefix=prefix) as conn, conn.SimpleQueue(queue) as simple:
            simple.put("prefixed")
            assert admin.llen(prefix + queue.name) == 1
        with plain(redis_url, global_keyprefix=prefix) as conn, conn.SimpleQueue(queue) as simple:
            message = simple.get(timeout=5)
            assert message.payload == "prefixed"
            message.ack()
    finally:
        leftovers = admin.keys(prefix + "*")  # the prefix has no glob characters
        if leftovers:
            admin.delete(*leftovers)


def test_ack_emulation_keeps_kombus_keys(
    redis_url: str, queue: Queue, keys: dict[str, str], admin: redis.Redis
) -> None:
    with ours(redis_url, **keys) as conn, conn.SimpleQueue(queue) as simple:
        simple.put("pending")
        message = simple.get(timeout=5)
        tag = message.delivery_tag
        assert admin.hexists(keys["unacked_key"], tag)
        assert admin.zscore(keys["unacked_index_key"], tag) is not None
        message.ack()
        assert not admin.hexists(keys["unacked_key"], tag)
        assert admin.zscore(keys["unacked_index_key"], tag) is None


def test_unacked_messages_are_restored_at_close_for_plain_kombu(
    redis_url: str, queue: Queue, keys: dict[str, str]
) -> None:
    with ours(redis_url, **keys) as conn, conn.SimpleQueue(queue) as simple:
        simple.put("left unacked")
        assert simple.get(timeout=5).payload == "left unacked"
    with plain(redis_url, **keys) as conn, conn.SimpleQueue(queue) as simple:
        message = simple.get(timeout=5)
        assert (message.payload, message.delivery_info["redelivered"]) == ("left unacked", True)
        message.ack()


def test_a_plain_kombu_sweep_restores_what_ours_left_past_visibility(
    redis_url: str, queue: Queue, keys: dict[str, str], admin: redis.Redis
) -> None:
    with ours(redis_url, **keys) as conn, conn.SimpleQueue(queue) as simple:
        simple.put("abandoned")
        assert simple.get(timeout=5).payload == "abandoned"
        assert admin.hlen(keys["unacked_key"]) == 1
        # a process that died with the delivery: its restore-at-close never runs
        conn.default_channel.qos._delivered.clear()
    assert admin.hlen(keys["unacked_key"]) == 1
    with ours(redis_url, visibility_timeout=0, **keys) as conn, conn.SimpleQueue(queue) as simple:
        conn.default_channel.qos.restore_visible(interval=1)
        assert admin.hlen(keys["unacked_key"]) == 0
        message = simple.get(timeout=5)
        assert (message.payload, message.delivery_info["redelivered"]) == ("abandoned", True)
        message.ack()


@needs_client_name
def test_fanout_reaches_plain_kombu_and_ours(redis_url: str, admin: redis.Redis) -> None:
    exchange = Exchange(f"test.fanout.{new_id()}", type="fanout", auto_delete=True)
    names = {"ours": f"kombu_rpc-test-{new_id()}", "theirs": f"kombu_rpc-test-{new_id()}"}
    conns = {
        "ours": ours(redis_url, client_name=names["ours"]),
        "theirs": plain(redis_url, client_name=names["theirs"]),
    }
    received: list[tuple[str, Any]] = []
    consumers = []
    for who, conn in conns.items():
        queue = Queue(f"test.fanout-q.{new_id()}", exchange, auto_delete=True, exclusive=True)
        callback = lambda body, message, who=who: (received.append((who, body)), message.ack())  # noqa: E731
        consumers.append(conn.Consumer(queue, callbacks=[callback]))
        consumers[-1].consume()

    def listening(who: str) -> bool:
        return any(
            c.get("name") == names[who] and int(c.get("sub", 0)) + int(c.get("psub", 0)) > 0
            for c in admin.client_list()
        )

    try:
        # kombu subscribes on its first poll: poll until both listen
        for who, conn in conns.items():
            while not listening(who):
                try:
                    conn.drain_events(timeout=0.1)
                except TimeoutError:
                    pass
        for who, conn in conns.items():
            conn.Producer().publish(f"from {who}", exchange=exchange, routing_key="")
        for who, conn in conns.items():
            while sum(1 for by, _ in received if by == who) < 2:
                conn.drain_events(timeout=5)
        assert sorted(received) == [
            ("ours", "from ours"),
            ("ours", "from theirs"),
            ("theirs", "from ours"),
            ("theirs", "from theirs"),
        ]
    finally:
        for consumer in consumers:
            consumer.cancel()
        for conn in conns.values():
            conn.release()


@pytest.fixture
def named(redis_url: str, admin: redis.Redis) -> tuple[str, Callable[[], int]]:
    """A client name of this test's own, and a function that drops every connection of
    that name (none of anybody else's)."""
    name = f"kombu_rpc-test-{new_id()}"

    def drop() -> int:
        ids = [c["id"] for c in admin.client_list() if c.get("name") == name]
        for client_id in ids:
            admin.client_kill_filter(_id=client_id)
        return len(ids)

    return name, drop


@needs_client_name
def test_the_shared_client_reconnects_after_its_connection_is_dropped(
    redis_url: str, queue: Queue, named: tuple[str, Callable[[], int]], client_builds: Counter[int]
) -> None:
    name, drop = named
    with ours(redis_url, client_name=name) as conn:
        channel = conn.default_channel
        with channel.conn_or_acquire() as client:
            pass
        producer = conn.Producer()
        producer.publish("before", routing_key=queue.name, declare=[queue])
        assert drop() >= 1
        failures = 0
        for attempt in range(3):
            try:
                producer.publish(f"after {attempt}", routing_key=queue.name)
                break
            except conn.connection_errors:
                failures += 1
        assert failures <= 1  # one command may hit the dropped socket; the next reconnects
        with channel.conn_or_acquire() as again:
            assert again is client
        bodies = take(conn, queue, 2)
        assert bodies[0] == "before" and bodies[1].startswith("after")
    assert list(client_builds.values()) == [1]


def test_requests_to_nobody_are_taken_back(redis_url: str, admin: redis.Redis) -> None:
    """kombu's Redis transport has no message expiry: a request nobody took is taken
    back from its queue when its call times out, or when the proxy closes."""
    queue = unique_queue_name("test.nobody")
    proxy = RPCProxy(redis_url, queue=queue, timeout=1.0)
    try:
        for n in range(2):
            unattended = proxy.fib.call_async(n)
            assert wait_until(lambda: admin.llen(queue) == 1)  # the request is in its queue
            with pytest.raises(RPCTimeout):
                unattended.result(10)
            assert wait_until(lambda: admin.llen(queue) == 0), admin.lrange(queue, 0, -1)
        # a call still pending when the proxy closes
        proxy.options(timeout=60).fib.call_async(3)
        assert wait_until(lambda: admin.llen(queue) == 1)
        proxy.close()
        assert admin.llen(queue) == 0
    finally:
        proxy.close()
        admin.delete(queue)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` (state in a broker, which nothing here can wait on) until it
    holds or ``timeout`` seconds passed."""
    deadline = monotonic() + timeout
    while not predicate():
        if monotonic() > deadline:
            return False
        threading.Event().wait(0.01)
    return True


def test_redis_socket_urls_serve_and_call_on_the_fast_transport(private_redis: PrivateRedis) -> None:
    url = private_redis.socket_url
    assert connect(url).transport_cls is redis_transport.SocketTransport
    queue = unique_queue_name()
    registry = make_registry({"add": lambda a, b: a + b})
    with (
        RPCServer(url, registry=registry, queue=queue).running(),
        RPCProxy(url, queue=queue, timeout=10) as proxy,
    ):
        assert [proxy.add(i, 1) for i in range(10)] == list(range(1, 11))
        client = private_redis.client()  # on TCP
        try:
            on_socket = [c for c in client.client_list() if c["laddr"].startswith(url.split("://", 1)[1])]
        finally:
            client.close()
        assert len(on_socket) >= 2, "the server and the proxy talk through the socket"


def test_stopped_servers_leave_no_control_queue(redis_url: str, admin: redis.Redis) -> None:
    """A wake-up from stop() that came after the loop deleted its control queue used to
    make the queue again (a list nobody deletes), for most servers stopped."""
    servers = [RPCServer(redis_url, registry=make_registry({}), queue=unique_queue_name()) for _ in range(8)]
    for server in servers:
        with server.running():
            pass
    left = [server.server_id for server in servers if admin.exists(f"kombu_rpc.server.{server.server_id}")]
    assert left == []


def test_a_channel_closes_though_another_thread_declared_a_fanout_queue_meanwhile(
    redis_url: str, admin: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # kombu's close() iterates Channel._fanout_queues, one dict for every channel of the
    # process, deleting the channel's own auto-delete fanout queues as it goes
    name = f"test.redis-transport.{new_id()}"
    exchange = Exchange(name, type="fanout", auto_delete=True)
    fanout_queues = kombu_redis.Channel._fanout_queues
    meanwhile = f"{name}.declared-meanwhile"
    with connect(redis_url) as conn:
        channel = conn.channel()
        assert isinstance(channel, redis_transport.Channel)
        Queue(name, exchange=exchange, routing_key="", exclusive=True, auto_delete=True)(channel).declare()
        assert name in fanout_queues
        delete = channel.queue_delete

        def queue_delete(queue: str, **kwargs: Any) -> Any:
            fanout_queues.setdefault(meanwhile, (name, ""))  # as another thread's declare would
            return delete(queue, **kwargs)

        monkeypatch.setattr(channel, "queue_delete", queue_delete)
        try:
            channel.close()
        finally:
            fanout_queues.pop(meanwhile, None)
            fanout_queues.pop(name, None)
        assert channel.closed
    assert not admin.exists(f"_kombu.binding.{name}")  # its binding went with it


def test_a_server_takes_requests_once_redis_confirmed_its_subscriptions(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kombu reads nothing from PUB/SUB while a Redis channel's prefetch is used up, and
    a server acks its requests in its own loop: requests taken before Redis confirmed
    the broadcast queue's subscription kept that confirmation unread, and the server
    reconnected every 10 s (seen under load, after a cut, at concurrency 4)."""
    consumed_meanwhile: list[set[str]] = []
    start_listening = _consumer.start_listening

    def recording(conn: Connection, channel: Any, timeout: float) -> None:
        start_listening(conn, channel, timeout)
        consumed_meanwhile.append(set(channel.active_queues))  # BRPOP's, not PUB/SUB's

    monkeypatch.setattr(_consumer, "start_listening", recording)
    queue = unique_queue_name("test.redis-transport")
    registry = make_registry({"echo": lambda value: value})
    server = RPCServer(redis_url, registry=registry, queue=queue, concurrency=4)
    with server.running(), RPCProxy(redis_url, queue=queue, timeout=5) as proxy:
        assert proxy.echo("after") == "after"
    assert consumed_meanwhile and all(queue not in names for names in consumed_meanwhile), consumed_meanwhile


def test_a_server_takes_its_first_request_without_waiting_for_a_brpop_to_end(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The BRPOP that a server sends while it waits for its subscriptions does not name
    the request queue, consumed after: the server ends it with a wake-up, or its first
    request would wait for it (kombu's ``brpop_timeout``, here longer than the call's;
    kombu before 5.7 has none: its BRPOPs last a second)."""
    monkeypatch.setattr(kombu_redis.Transport, "brpop_timeout", 60, raising=False)
    queue = unique_queue_name("test.redis-transport")
    server = RPCServer(redis_url, registry=make_registry({"echo": lambda value: value}), queue=queue)
    with server.running(), RPCProxy(redis_url, queue=queue, timeout=10) as proxy:
        assert proxy.echo("first") == "first"
