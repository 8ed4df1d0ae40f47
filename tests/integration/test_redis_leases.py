"""Servers on Redis hold leases on their own queues (:mod:`kombu_rpc._transports.leases`):
what a killed server left bound is swept by another server once its lease ran out, a
server whose queues were swept binds them again, and a server that stops gives its
lease up. Proxies hold one on their reply queue: the list that late replies make for
a killed proxy is swept too. On the shared Redis, with a queue, an exchange and servers
of the test's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection

from kombu_rpc import Event, EventPublisher, Registry, RPCProxy, RPCServer
from kombu_rpc._transports import REPLY_QUEUE_PREFIX, leases
from kombu_rpc.testing import unique_queue_name
from kombu_rpc.topology import (
    BROADCAST_EXCHANGE_TEMPLATE,
    BROADCAST_QUEUE_TEMPLATE,
    CANCEL_EXCHANGE_TEMPLATE,
    CANCEL_QUEUE_TEMPLATE,
    CONTROL_QUEUE_TEMPLATE,
    EVENT_QUEUE_TEMPLATE,
)

from ..conftest import LogWaiter, Recorder, forget_leases
from .test_transports import stop, wait_ready

pytestmark = pytest.mark.timeout(60)

SERVER_PROGRAM = Path(__file__).with_name("transport_server.py")
REPO = Path(__file__).resolve().parents[2]
#: The lease of the test's servers in processes of their own, in seconds (an hour by
#: default): a test has them run out when it wants.
TTL = 60.0
#: Longest wait for something the servers do within a lease or two.
WAIT = 15.0


def redis_urls() -> list[str]:
    from ..conftest import real_brokers

    return [url for url in real_brokers() if url.startswith("redis")]


@pytest.fixture(params=redis_urls(), ids=["redis"] * len(redis_urls()))
def redis_url(request: pytest.FixtureRequest) -> str:
    from ..conftest import checked_broker

    return checked_broker(request)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url, socket_timeout=10) as client:
        yield client


@pytest.fixture
def names(redis_url: str, client: redis.Redis) -> Iterator[tuple[str, str]]:
    """A request queue and an event exchange of the test's own; what is left of them
    on Redis is deleted after the test."""
    queue, exchange = unique_queue_name(), unique_queue_name("test.events")
    yield queue, exchange
    forget_leases(client, queue)
    for key in client.scan_iter(match=f"*{queue}*"):
        client.delete(key)
    for key in client.scan_iter(match=f"*{exchange}*"):
        client.delete(key)


def bound(client: redis.Redis, exchange: str) -> set[str]:
    """The queues bound to ``exchange`` in kombu's binding table on Redis."""
    return {member.decode().split("\x06\x16")[-1] for member in client.smembers(f"_kombu.binding.{exchange}")}


def holder(member: bytes) -> tuple[str, str] | None:
    """Who holds a lease: ``("server", id)`` or ``("proxy", id)``; ``None`` for a member
    that is not a lease of kombu_rpc's (another program's, on the shared Redis)."""
    try:
        lease = json.loads(member)
    except ValueError:
        return None
    found = [(role, lease[role]) for role in leases.ROLES if isinstance(lease, dict) and role in lease]
    return found[0] if len(found) == 1 else None


def held_by(client: redis.Redis, holder_id: str, role: str = "server") -> list[dict[str, Any]]:
    """The leases server (or proxy) ``holder_id`` holds."""
    members = client.zrange(leases.LEASES, 0, -1)
    return [json.loads(member) for member in members if holder(member) == (role, holder_id)]


def wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.05)


def child_env() -> dict[str, str]:
    """The environment of a process of the test's own, which imports this checkout."""
    pythonpath = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH", ""))))
    return {**os.environ, "PYTHONPATH": pythonpath}


def start_server(redis_url: str, queue: str, exchange: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A server of ``queue`` handling ``exchange``'s events, with short leases, in a
    process of its own; and its server id."""
    spec = {"url": redis_url, "events": exchange, "lease_ttl": TTL}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(SERVER_PROGRAM), json.dumps(spec), queue],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
    try:
        return process, wait_ready(process, log, queue)
    except BaseException:
        stop(process)
        raise


def publish(redis_url: str, exchange: str, payload: Any) -> None:
    with EventPublisher(redis_url, exchange) as publisher:
        publisher.publish("news.today", payload)


def expire(client: redis.Redis, holder_id: str, role: str = "server") -> None:
    """Have the leases of server (or proxy) ``holder_id`` run out now (as an hour
    without renewal would)."""
    for member in client.zrange(leases.LEASES, 0, -1):
        if holder(member) == (role, holder_id):
            client.zadd(leases.LEASES, {member: 0}, xx=True)


def test_what_a_killed_server_left_is_swept_once_its_lease_ran_out(
    redis_url: str,
    client: redis.Redis,
    names: tuple[str, str],
    tmp_path: Path,
    log_waiter: Callable[[str], LogWaiter],
) -> None:
    queue, exchange = names
    process, server_id = start_server(redis_url, queue, exchange, tmp_path / "server.log")
    handler = "__main__.make_registry.<locals>.news"
    own = {
        "events": EVENT_QUEUE_TEMPLATE.format(exchange=exchange, handler=handler, server_id=server_id),
        "broadcasts": BROADCAST_QUEUE_TEMPLATE.format(queue=queue, server_id=server_id),
        "cancels": CANCEL_QUEUE_TEMPLATE.format(queue=queue, server_id=server_id),
    }
    try:
        wait_until(
            lambda: len(held_by(client, server_id)) == 2, "the server and its cancel listener hold leases"
        )
        queues = {name for lease in held_by(client, server_id) for name, _ in lease["queues"]}
        assert queues == {*own.values(), CONTROL_QUEUE_TEMPLATE.format(server_id=server_id)}
        assert own["events"] in bound(client, exchange)
    finally:
        process.kill()
        process.wait(10)
        stop(process)

    # Left behind: the dead server's queues are still bound, and its event queue fills.
    assert own["events"] in bound(client, exchange)
    assert own["broadcasts"] in bound(client, BROADCAST_EXCHANGE_TEMPLATE.format(queue=queue))
    assert own["cancels"] in bound(client, CANCEL_EXCHANGE_TEMPLATE.format(queue=queue))
    publish(redis_url, exchange, "unread")
    assert client.llen(own["events"]) == 1
    assert len(held_by(client, server_id)) == 2  # its leases last a minute yet

    expire(client, server_id)
    swept = log_waiter(f"deleted the queues of server {server_id}")
    with RPCServer(redis_url, registry=Registry(), queue=queue).running():  # sweeps at start
        wait_until(lambda: held_by(client, server_id) == [], "the dead server's leases were swept")
        assert own["events"] not in bound(client, exchange)
        assert own["broadcasts"] not in bound(client, BROADCAST_EXCHANGE_TEMPLATE.format(queue=queue))
        assert own["cancels"] not in bound(client, CANCEL_EXCHANGE_TEMPLATE.format(queue=queue))
        assert not client.exists(own["events"])
        publish(redis_url, exchange, "for nobody")
        assert not client.exists(own["events"])
    if swept.records:  # (another program's server on the same Redis may have swept them first)
        assert swept.records[0].levelname == "WARNING"


def test_a_server_binds_its_swept_queues_again(
    redis_url: str,
    client: redis.Redis,
    names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    log_waiter: Callable[[str], LogWaiter],
) -> None:
    queue, exchange = names
    monkeypatch.setattr(leases, "RENEW_EVERY", 1.0)
    received = Recorder()
    registry = Registry()

    @registry.subscribe(exchange, "news.#")
    def news(event: Event) -> None:
        received.add(event.payload)

    server = RPCServer(redis_url, registry=registry, queue=queue)
    handler = f"{news.__module__}.{news.__qualname__}"
    with server.running():
        server_id = server.server_id
        event_queue = EVENT_QUEUE_TEMPLATE.format(exchange=exchange, handler=handler, server_id=server_id)
        unbound = log_waiter(f"its queue {event_queue!r} was unbound")
        wait_until(lambda: len(held_by(client, server_id)) == 2, "the server holds its leases")
        publish(redis_url, exchange, "before")
        received.wait(1)
        # as another server's sweep would, had this one not renewed its lease for an hour
        swept = log_waiter(f"deleted the queues of server {server_id}")
        with Connection(redis_url) as conn:
            deadline = time.monotonic() + WAIT
            while not swept.records:  # again if the server renewed in between
                assert time.monotonic() < deadline, "its leases were not swept"
                expire(client, server_id)
                leases.sweep(conn.default_channel)
        assert unbound.seen.wait(WAIT), "the server did not bind its event queue again"
        assert unbound.records[0].levelname == "WARNING"
        wait_until(lambda: event_queue in bound(client, exchange), "the event queue is bound again")
        wait_until(lambda: len(held_by(client, server_id)) == 2, "both leases are held again")
        publish(redis_url, exchange, "after")
        assert received.wait(2) == ["before", "after"]
    assert held_by(client, server_id) == []


def test_a_sweep_touches_nothing_but_kombu_rpcs_own_queues(
    redis_url: str, client: redis.Redis, names: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    queue, _ = names
    monkeypatch.setattr(leases, "LEASES", f"{queue}.leases")  # of the test's own
    victim = f"{queue}.victim"
    client.rpush(victim, "keep me")
    malformed = [
        json.dumps({"server": "x", "queues": [[victim, []]]}),  # not a kombu_rpc queue
        json.dumps({"server": "x", "queues": [["kombu_rpc.x", "not a list"]]}),
        json.dumps({"queues": []}),
        "not json",
    ]
    client.zadd(leases.LEASES, {member: 0 for member in malformed})
    with Connection(redis_url) as conn:
        assert leases.sweep(conn.default_channel) == len(malformed)
    assert client.lrange(victim, 0, -1) == [b"keep me"]
    assert not client.exists(leases.LEASES)  # dropped, all of them


def test_a_stopped_server_holds_no_lease(redis_url: str, client: redis.Redis, names: tuple[str, str]) -> None:
    queue, _ = names
    server = RPCServer(redis_url, registry=Registry(), queue=queue)
    with server.running():
        wait_until(lambda: len(held_by(client, server.server_id)) == 2, "the server holds its leases")
        (lease,) = [
            score
            for member, score in client.zrange(leases.LEASES, 0, -1, withscores=True)
            if holder(member) == ("server", server.server_id) and "kombu_rpc.server." in member.decode()
        ]
        seconds, micros = client.time()
        left = lease / 1000 - (seconds + micros / 1e6)
        assert leases.LEASE_TTL - 60 < left <= leases.LEASE_TTL  # an hour, on Redis's clock
    assert held_by(client, server.server_id) == []


def test_a_lease_that_cannot_be_renewed_does_not_stop_the_server(
    redis_url: str,
    client: redis.Redis,
    names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    log_waiter: Callable[[str], LogWaiter],
) -> None:
    queue, _ = names
    leases_key = f"{queue}.leases"  # of the test's own: the shared one stays as it is
    monkeypatch.setattr(leases, "LEASES", leases_key)
    client.set(leases_key, "not a sorted set")  # WRONGTYPE for every lease command
    failed = log_waiter("could not renew its lease")
    registry = Registry()
    registry.remote(name="echo")(lambda value: value)
    with RPCServer(redis_url, registry=registry, queue=queue).running():
        assert failed.seen.wait(WAIT)
        with RPCProxy(redis_url, queue=queue, timeout=10) as proxy:
            assert proxy.echo("served") == "served"
    assert "WRONGTYPE" in failed.records[0].getMessage()


def test_leases_a_sweep_took_but_did_not_finish_are_swept_again(
    redis_url: str, client: redis.Redis, names: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    queue, _ = names
    monkeypatch.setattr(leases, "LEASES", f"{queue}.leases")  # of the test's own
    monkeypatch.setattr(leases, "SWEEP_CLAIM", 0.5)
    left = f"kombu_rpc.server.{queue}"  # what a dead server left: its control queue's list
    client.rpush(left, "left")
    client.zadd(leases.LEASES, {json.dumps({"server": "dead", "queues": [[left, []]]}): 0})
    # a sweeper that claimed the lease, then died before it deleted anything
    take = client.register_script(leases._TAKE)
    _, taken = take(keys=[leases.LEASES], args=[leases.SWEEP_BATCH, 500])
    assert holder(taken) == ("server", "dead")
    with Connection(redis_url) as conn:
        assert leases.sweep(conn.default_channel) == 0  # claimed: not yet
        assert client.exists(left)
        wait_until(lambda: leases.sweep(conn.default_channel) == 1, "the claim ran out and was swept")
    assert not client.exists(left)
    assert not client.exists(leases.LEASES)


def test_a_proxy_holds_a_lease_on_its_reply_queue_until_it_closes(
    redis_url: str, client: redis.Redis, names: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    queue, _ = names
    monkeypatch.setattr(leases, "RENEW_EVERY", 0.2)
    registry = Registry()
    registry.remote(name="echo")(lambda value: value)
    with RPCServer(redis_url, registry=registry, queue=queue).running():
        with RPCProxy(redis_url, queue=queue, timeout=10) as proxy:
            uid = proxy.reply_queue.removeprefix(REPLY_QUEUE_PREFIX)
            assert held_by(client, uid, "proxy") == []  # connects at its first call
            assert proxy.echo("first") == "first"
            (lease,) = held_by(client, uid, "proxy")
            assert lease["queues"] == [[proxy.reply_queue, []]]
            # renewed while the proxy is idle (its link's thread looks every second)
            member = json.dumps(lease, separators=(",", ":"))
            first = client.zscore(leases.LEASES, member)
            wait_until(lambda: (client.zscore(leases.LEASES, member) or 0) > (first or 0), "a renewal")
        assert held_by(client, uid, "proxy") == []


#: A proxy in a process of its own: prints its reply queue, then calls ``slow``.
PROXY_PROGRAM = """
import sys
from kombu_rpc import RPCProxy
proxy = RPCProxy(sys.argv[1], queue=sys.argv[2], timeout=60)
print(proxy.reply_queue, flush=True)
proxy.slow()
"""


def test_what_a_killed_proxy_left_is_swept_once_its_lease_ran_out(
    redis_url: str,
    client: redis.Redis,
    names: tuple[str, str],
    log_waiter: Callable[[str], LogWaiter],
) -> None:
    queue, _ = names
    entered, release = threading.Event(), threading.Event()
    registry = Registry()

    @registry.remote(name="slow")
    def slow() -> str:
        entered.set()
        release.wait(WAIT)
        return "too late"

    try:
        with RPCServer(redis_url, registry=registry, queue=queue).running():
            process = subprocess.Popen(
                [sys.executable, "-c", PROXY_PROGRAM, redis_url, queue],
                stdout=subprocess.PIPE,
                env=child_env(),
            )
            try:
                assert process.stdout is not None
                reply_queue = process.stdout.readline().decode().strip()
                assert reply_queue.startswith(REPLY_QUEUE_PREFIX), reply_queue
                assert entered.wait(WAIT), "the proxy's call did not come"
            finally:
                process.kill()
                process.wait(10)
                if process.stdout is not None:
                    process.stdout.close()
            release.set()  # the reply goes to a proxy that is gone
            wait_until(lambda: client.llen(reply_queue) == 1, "the reply made the dead proxy's list again")
    finally:
        release.set()
    uid = reply_queue.removeprefix(REPLY_QUEUE_PREFIX)
    assert len(held_by(client, uid, "proxy")) == 1  # it lasts an hour yet

    expire(client, uid, "proxy")
    swept = log_waiter(f"deleted the queues of proxy {uid}")
    with RPCServer(redis_url, registry=Registry(), queue=queue).running():  # sweeps at start
        wait_until(lambda: held_by(client, uid, "proxy") == [], "the dead proxy's lease was swept")
        assert not client.exists(reply_queue)
    if swept.records:  # (another program's server on the same Redis may have swept it first)
        assert swept.records[0].levelname == "INFO"


#: A proxy in a process of its own that is not closed: prints its reply queue, calls
#: ``echo``, says so, and exits when its standard input closes.
UNCLOSED_PROGRAM = """
import sys
from kombu_rpc import RPCProxy
proxy = RPCProxy(sys.argv[1], queue=sys.argv[2], timeout=10)
print(proxy.reply_queue, proxy.echo("called"), flush=True)
sys.stdin.read()
"""


def test_a_proxy_left_open_gives_up_its_lease_at_exit(
    redis_url: str, client: redis.Redis, names: tuple[str, str]
) -> None:
    queue, _ = names
    registry = Registry()
    registry.remote(name="echo")(lambda value: value)
    with RPCServer(redis_url, registry=registry, queue=queue).running():
        process = subprocess.Popen(
            [sys.executable, "-c", UNCLOSED_PROGRAM, redis_url, queue],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env(),
        )
        try:
            assert process.stdout is not None and process.stdin is not None
            reply_queue, said = process.stdout.readline().decode().split()
            assert said == "called"
            uid = reply_queue.removeprefix(REPLY_QUEUE_PREFIX)
            assert len(held_by(client, uid, "proxy")) == 1
            process.stdin.close()  # the program ends, its proxy still open
            assert process.wait(WAIT) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            if process.stdout is not None:
                process.stdout.close()
    assert held_by(client, uid, "proxy") == []
