"""The private broker nodes of the fault tests (``tests/brokers.py``): a fault on them
leaves the shared brokers alone, and a node leaves nothing behind once stopped, even
when its graceful stop fails or the test process dies."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from time import monotonic, sleep

import amqp
import pytest
import redis

from kombu_rpc.topology import new_id

from ..brokers import PrivateNode, PrivateRabbit, PrivateRedis, missing, start_private
from ..conftest import unreachable_reason

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]

#: The shared brokers, which other programs use too.
SHARED_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parents[2]


class AMQPProbe:
    """An AMQP connection of our own that never reconnects: once cut, it fails."""

    def __init__(self, port: int) -> None:
        self.queue = f"test.probe.{new_id()}"
        self.conn = amqp.Connection(f"127.0.0.1:{port}", userid="guest", password="guest", connect_timeout=5)
        self.conn.connect()
        self.channel = self.conn.channel()
        self.channel.queue_declare(self.queue, exclusive=True)  # goes with the connection

    def works(self) -> bool:
        """A message goes to our queue and back, on this same connection."""
        body = new_id()
        try:
            self.channel.basic_publish(amqp.Message(body), exchange="", routing_key=self.queue)
            message = self.channel.basic_get(self.queue, no_ack=True)  # same channel: in order
        except (amqp.exceptions.AMQPError, OSError):
            return False
        return message is not None and message.body == body

    def close(self) -> None:
        try:
            self.conn.close()
        except (amqp.exceptions.AMQPError, OSError):
            self.conn.collect()


class RedisProbe:
    """A Redis connection of our own; redis-py would reconnect a cut one silently, so
    ``works()`` also checks that the server still knows it by the same client id."""

    def __init__(self, port: int) -> None:
        self.key = f"test.probe.{new_id()}"
        self.client = redis.Redis(
            host="127.0.0.1",
            port=port,
            single_connection_client=True,
            socket_timeout=5,
            socket_connect_timeout=5,
        )
        self.client.client_setname("kombu-rpc-test-probe")
        self.id = self.client.client_id()

    def works(self) -> bool:
        value = new_id()
        try:
            same = self.client.client_id() == self.id
            self.client.set(self.key, value, ex=60)
            return same and self.client.get(self.key) == value.encode()
        except redis.RedisError:
            return False

    def close(self) -> None:
        try:
            self.client.delete(self.key)
        except redis.RedisError:
            pass
        self.client.close()


@pytest.fixture
def shared_brokers() -> None:
    """The shared brokers answer; else skip, or fail when brokers are required."""
    for url in (SHARED_AMQP_URL, SHARED_REDIS_URL):
        reason = unreachable_reason(url)
        if reason is not None:
            missing(reason)


def test_faults_on_private_nodes_leave_the_shared_brokers_alone(
    shared_brokers: None, private_rabbit: PrivateRabbit, private_redis: PrivateRedis
) -> None:
    assert private_rabbit.port not in (5672, 25672) and private_redis.port != 6379
    probes: list[AMQPProbe | RedisProbe] = []
    try:
        shared = [AMQPProbe(5672), RedisProbe(6379)]
        probes += shared
        private = [AMQPProbe(private_rabbit.port), RedisProbe(private_redis.port)]
        probes += private
        assert all(probe.works() for probe in probes)
        # When the private nodes cut every connection, and RabbitMQ restarts
        private_rabbit.close_all_connections()
        private_redis.close_all_connections()
        private_rabbit.restart()
        # Then the faults happened (our connections to the private nodes are gone) ...
        assert [probe.works() for probe in private] == [False, False]
        # ... and our connections to the shared brokers still work, unbroken
        assert [probe.works() for probe in shared] == [True, True]
    finally:
        for probe in probes:
            probe.close()


def _group(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def _gone(node: PrivateNode, pid: int, directory: Path) -> None:
    """Nothing of the node is left: no process in its group, no directory, no listener."""
    assert _group(pid) == []
    assert not directory.exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", node.port), timeout=2).close()


@pytest.fixture(params=[PrivateRedis, PrivateRabbit], ids=["redis", "amqp"])
def fresh_node(request: pytest.FixtureRequest) -> Iterator[PrivateNode]:
    """A node of the test's own (not the run's shared private one), which it stops."""
    node = start_private(request.param)
    try:
        yield node
    finally:
        node.stop()


def test_a_stopped_node_leaves_nothing_behind(fresh_node: PrivateNode) -> None:
    pid, directory = fresh_node.pid, fresh_node.dir
    assert pid is not None and directory is not None and directory.is_dir()
    socket.create_connection(("127.0.0.1", fresh_node.port), timeout=5).close()
    fresh_node.stop()
    _gone(fresh_node, pid, directory)
    fresh_node.stop()  # stopping again is harmless


def test_a_node_whose_graceful_stop_fails_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    node = start_private(PrivateRedis)
    try:
        pid, directory = node.pid, node.dir
        assert pid is not None and directory is not None

        def fail(*args: object) -> None:
            raise subprocess.TimeoutExpired("shutdown", 60)

        monkeypatch.setattr(node, "_graceful_stop", fail)
        node.stop()
        _gone(node, pid, directory)
    finally:
        node.stop()


def test_a_node_is_removed_when_the_test_process_dies() -> None:
    """The test process ends without finalizers or atexit hooks (as on SIGKILL, or
    pytest-timeout's thread method): the node's reaper removes it."""
    if PrivateRedis.unavailable_reason() is not None:
        missing(str(PrivateRedis.unavailable_reason()))
    script = (
        "import os\n"
        "from tests.brokers import PrivateRedis\n"
        "node = PrivateRedis()\n"
        "node.start()\n"
        "print(node.pid, node.port, node.dir, flush=True)\n"
        "os._exit(1)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.stdout, done.stderr
    pid_text, port, directory = done.stdout.split()
    pid = int(pid_text)
    node = PrivateRedis()
    node.port = int(port)
    deadline = monotonic() + 20  # the reaper acts once it sees the test process gone
    while _group(pid) or Path(directory).exists():
        assert monotonic() < deadline, "the reaper did not remove the node"
        sleep(0.1)
    _gone(node, pid, Path(directory))
