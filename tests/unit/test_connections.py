"""Connections from a URL list and heartbeats, without a broker: the random order of a
URL list, the AMQP heartbeat a URL gets, the transport class kept across kombu's
failover (``Connection.switch``), and the heartbeater's thread on a stand-in connection."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from kombu import Connection
from kombu.transport import pyamqp as kombu_pyamqp

from kombu_rpc import _transports as seam
from kombu_rpc._transports import AMQP_HEARTBEAT, Kind, PinnedConnection, PollingConnection, kind
from kombu_rpc._transports import amqp as fast_amqp
from kombu_rpc._transports import filesystem as fast_filesystem
from kombu_rpc._transports import redis as fast_redis
from kombu_rpc.connection import Heartbeater, connect, publishing_clone

pytestmark = pytest.mark.timeout(30)

NODES = [f"amqp://guest:guest@127.0.0.1:{port}//" for port in (5701, 5702, 5703)]


# -- URL lists: a random start, every URL once per round --------------------------------


def test_a_url_list_is_tried_in_a_random_order_each_connection_its_own() -> None:
    conns = [connect(";".join(NODES)) for _ in range(60)]
    firsts = {conn.port for conn in conns}
    assert len(firsts) > 1  # all 60 on one node: a chance of 3 in 3**60
    for conn in conns:
        assert sorted(conn.alt) == sorted(NODES)  # every URL, once
        assert conn.port == int(conn.alt[0].rsplit(":", 1)[1].strip("/"))  # starts at the first
        assert conn.failover_strategy is not None and conn._failover_strategy == "round-robin"


def test_a_connection_given_keeps_its_order_and_strategy() -> None:
    given = Connection(";".join(NODES), failover_strategy="shuffle")
    for _ in range(20):
        conn = connect(given)
        assert conn.alt == NODES and conn.port == 5701
        assert conn._failover_strategy == "shuffle"


def test_blank_entries_of_a_url_list_are_ignored() -> None:
    conn = connect(f" {NODES[0]} ;;{NODES[1]};")
    assert sorted(conn.alt) == sorted(NODES[:2])


# -- heartbeats ------------------------------------------------------------------------


def test_amqp_urls_ask_for_heartbeats_unless_they_say_otherwise() -> None:
    assert connect(NODES[0]).heartbeat == AMQP_HEARTBEAT
    assert connect(";".join(NODES)).heartbeat == AMQP_HEARTBEAT
    assert connect("amqps://guest:guest@127.0.0.1//").heartbeat == AMQP_HEARTBEAT
    assert connect(NODES[0] + "?heartbeat=5").heartbeat == 5
    assert not connect(NODES[0] + "?heartbeat=0").heartbeat
    for _ in range(10):  # the first URL's holds for the list, whichever URL is tried first
        conn = connect(";".join([NODES[0] + "?heartbeat=5", *NODES[1:]]))
        assert conn.heartbeat == 5
        conn.maybe_switch_next()
        assert conn.heartbeat == 5
    # the clones the server and the proxy make keep it
    assert connect(NODES[0]).clone().heartbeat == AMQP_HEARTBEAT


def test_a_connection_given_keeps_its_own_heartbeat() -> None:
    assert not connect(Connection(NODES[0])).heartbeat
    assert connect(Connection(NODES[0], heartbeat=7)).heartbeat == 7


def test_other_transports_get_no_heartbeat() -> None:
    for url in ("redis://127.0.0.1:6379/0", "memory://", "filesystem://"):
        assert not connect(url).heartbeat, url


def test_publishing_clones_ask_for_no_heartbeats() -> None:
    """Nothing calls heartbeat_check on them: the broker would close them while idle."""
    conn = connect(NODES[0])
    for confirm in (True, False):
        clone = publishing_clone(conn, confirm)
        assert not clone.heartbeat
        assert clone.transport_cls is fast_amqp.Transport
        assert bool(clone.transport_options.get("confirm_publish")) is confirm
    assert conn.heartbeat == AMQP_HEARTBEAT and conn.transport_options == {}


# -- the transport class survives kombu's failover --------------------------------------


def test_a_failover_keeps_kombu_rpcs_amqp_transport() -> None:
    conn = connect(";".join(NODES))
    assert isinstance(conn, PinnedConnection)
    for _ in range(4):  # round and round the list
        conn.maybe_switch_next()
        assert conn.transport_cls is fast_amqp.Transport
        assert isinstance(conn.transport, fast_amqp.Transport) and kind(conn) is Kind.AMQP
        assert conn.heartbeat == AMQP_HEARTBEAT
    clone = conn.clone()
    assert clone.transport_cls is fast_amqp.Transport and clone.port == conn.port
    clone.switch(NODES[0])
    assert clone.transport_cls is fast_amqp.Transport and clone.port == 5701


def test_a_failover_keeps_kombu_rpcs_redis_transport() -> None:
    conn = connect("redis://127.0.0.1:6391/0;redis://127.0.0.1:6392/0")
    conn.maybe_switch_next()
    assert conn.transport_cls is fast_redis.Transport and kind(conn) is Kind.REDIS
    assert conn.transport_options["socket_timeout"] == seam.REDIS_SOCKET_TIMEOUT
    assert conn.clone().transport_cls is fast_redis.Transport


def test_a_failover_keeps_the_polling_transport_and_its_interval(tmp_path: Any) -> None:
    options = {"polling_interval": 0.2, "data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path)}
    conn = connect(Connection("filesystem:///a;filesystem:///b", transport_options=options))
    assert isinstance(conn, PollingConnection)
    for candidate in (conn, conn.clone()):
        candidate.maybe_switch_next()
        assert candidate.transport_cls is fast_filesystem.Transport
        assert candidate.transport.polling_interval == 0.2 and kind(candidate) is Kind.POLLING


def test_a_failover_to_a_url_of_another_transport_takes_that_one() -> None:
    conn = connect(f"{NODES[0]};amqps://guest:guest@127.0.0.1:5671//")
    conn.switch("amqps://guest:guest@127.0.0.1:5671//")
    assert conn.transport_cls == "amqps" and kind(conn) is Kind.AMQP
    assert not issubclass(conn.get_transport_cls(), fast_amqp.Transport)
    conn.switch(NODES[0])
    assert conn.transport_cls == "amqp"  # kombu's from then on: nothing pinned is left


def test_a_failover_keeps_a_transport_class_the_caller_chose() -> None:
    class Mine(kombu_pyamqp.Transport):  # type: ignore[misc]
        pass

    conn = connect(Connection(";".join(NODES), transport=Mine))
    assert conn.transport_cls is Mine
    conn.maybe_switch_next()
    assert conn.transport_cls is Mine


# -- the heartbeater's thread -----------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    @contextmanager
    def having_timeout(self, timeout: float | None) -> Iterator[None]:
        self.timeouts.append(timeout)
        yield


class FakeAmqp:
    """What the heartbeater uses of a py-amqp connection."""

    def __init__(self, heartbeat: float) -> None:
        self.heartbeat = heartbeat
        self.connected = True
        self.transport = FakeTransport()
        self.bytes_sent = 0
        self.prev_recv: int | None = 0
        self.beats = 0
        self.beaten = threading.Condition()
        self.hold: threading.Event | None = None  # a beat waits for it (a slow write)
        self.writing = threading.Event()  # a beat started

    def send_heartbeat(self) -> None:
        self.writing.set()
        if self.hold is not None:
            self.hold.wait(10)
        with self.beaten:
            self.bytes_sent += 1
            self.beats += 1
            self.beaten.notify_all()

    def wait_beats(self, count: int, timeout: float) -> bool:
        with self.beaten:
            return self.beaten.wait_for(lambda: self.beats >= count, timeout)


@pytest.fixture
def heartbeater() -> Iterator[Heartbeater]:
    beater = Heartbeater()
    yield beater
    beater.close()


def test_the_heartbeater_beats_only_while_the_owner_is_away(heartbeater: Heartbeater) -> None:
    amqp = FakeAmqp(heartbeat=0.2)  # a tick every 0.05 s
    heartbeater.bind(amqp)
    assert not amqp.wait_beats(1, 0.5)  # the owner is there: it beats itself
    heartbeater.away()
    assert amqp.wait_beats(3, 5)
    assert amqp.prev_recv is None  # the broker's beats, unread meanwhile, do not count as missed
    assert set(amqp.transport.timeouts) == {10.0}  # each write bounded (PUBLISH_TIMEOUT)
    heartbeater.back()
    beats = amqp.beats
    assert not amqp.wait_beats(beats + 1, 0.5)


def test_the_heartbeater_stays_quiet_while_the_owner_writes(heartbeater: Heartbeater) -> None:
    amqp = FakeAmqp(heartbeat=0.2)
    heartbeater.bind(amqp)
    heartbeater.away()
    writes = threading.Event()

    def owner_writes() -> None:  # as if frames were written all along (by a stand-in)
        while not writes.wait(0.01):
            amqp.bytes_sent += 1

    writer = threading.Thread(target=owner_writes)
    writer.start()
    try:
        assert not amqp.wait_beats(1, 0.5)
    finally:
        writes.set()
        writer.join(5)
    assert amqp.wait_beats(1, 5)


def test_back_waits_until_a_heartbeat_being_written_is_whole(heartbeater: Heartbeater) -> None:
    amqp = FakeAmqp(heartbeat=0.2)
    amqp.hold = threading.Event()
    heartbeater.bind(amqp)
    heartbeater.away()
    returned = threading.Event()

    def come_back() -> None:
        heartbeater.back()
        returned.set()

    owner = threading.Thread(target=come_back)
    try:
        assert amqp.writing.wait(5)
        owner.start()
        assert not returned.wait(0.3)  # still writing: the owner must not touch the socket
        amqp.hold.set()
        assert returned.wait(5)
    finally:
        amqp.hold.set()
        if owner.ident is not None:
            owner.join(5)
    assert amqp.beats >= 1


def test_the_heartbeater_drops_a_connection_it_cannot_write_to(heartbeater: Heartbeater) -> None:
    amqp = FakeAmqp(heartbeat=0.2)
    amqp.connected = False  # closed under it
    heartbeater.bind(amqp)
    heartbeater.away()
    assert not amqp.wait_beats(1, 0.5)
    fresh = FakeAmqp(heartbeat=0.2)  # the owner reconnected
    heartbeater.bind(fresh)
    assert fresh.wait_beats(1, 5)


def test_without_negotiated_heartbeats_the_heartbeater_waits(heartbeater: Heartbeater) -> None:
    amqp = FakeAmqp(heartbeat=0)
    heartbeater.bind(amqp)
    heartbeater.away()
    assert not amqp.wait_beats(1, 0.5)


def test_close_ends_the_thread() -> None:
    beater = Heartbeater()
    beater.bind(FakeAmqp(heartbeat=60))
    thread = beater._thread
    assert thread is not None and thread.is_alive() and thread.name == "kombu_rpc-heartbeat"
    beater.close()
    assert not thread.is_alive()
