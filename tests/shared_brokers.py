"""What a test run does to the brokers other programs share (RabbitMQ on 5672, Redis on
6379): it must leave their clients connected and leave nothing of its own behind.

:class:`Watch` opens a canary connection to each shared broker and lists the queues,
exchanges and keys named like the suite's own before the run; after it, the canaries
must still be the same, unbroken connections, and nothing new named like the suite's
may remain. ``tests/conftest.py`` checks the canaries when
``KOMBU_RPC_CHECK_SHARED_BROKERS`` is ``canary`` (as CI sets it), and the leftovers too
when it is ``1``: the brokers must then be the suite's alone, or another program's
queues named ``test.*`` could be taken for leftovers.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field

import redis
from amqp import Connection as AmqpConnection

#: Names the suite gives its queues, exchanges and keys (kombu_rpc's own, the tests').
OWN_PREFIXES = ("kombu_rpc.", "test.", "ci.", "_kombu.binding.kombu_rpc.", "_kombu.binding.test.")
AMQP_HOST, REDIS_URL = "127.0.0.1:5672", "redis://127.0.0.1:6379/0"


def _own(names: list[str]) -> set[str]:
    return {name for name in names if name.startswith(OWN_PREFIXES)}


def rabbit_names(what: str) -> set[str] | None:
    """The suite's queues or exchanges on the shared RabbitMQ (``None``: cannot list)."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return None
    done = subprocess.run([ctl, "-q", what, "name"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return None
    return _own([line.strip() for line in done.stdout.splitlines()[1:]])


@dataclass
class Watch:
    """Canaries and the suite's names on the shared brokers, taken before a run."""

    amqp: AmqpConnection
    redis: redis.Redis
    redis_client_id: int
    before: dict[str, set[str] | None] = field(default_factory=dict)

    @classmethod
    def start(cls) -> Watch:
        amqp = AmqpConnection(AMQP_HOST, userid="guest", password="guest", heartbeat=0, connect_timeout=5)
        amqp.connect()
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=10, single_connection_client=True)
        client.client_setname("kombu_rpc-canary")
        watch = cls(amqp, client, int(client.client_id()))
        watch.before = watch.names()
        return watch

    def names(self) -> dict[str, set[str] | None]:
        keys = [key.decode() for key in self.redis.scan_iter(count=1000)]
        return {
            "Redis key": _own(keys),
            "RabbitMQ queue": rabbit_names("list_queues"),
            "RabbitMQ exchange": rabbit_names("list_exchanges"),
        }

    def finish(self, leftovers: bool = True) -> list[str]:
        """What is wrong after the run: canaries cut, or (with ``leftovers``) the
        suite's names left behind (a Redis key with a time to live is not left behind:
        it expires)."""
        problems = []
        try:
            channel = self.amqp.channel()
            channel.exchange_declare("amq.direct", "direct", passive=True)
            channel.close()
        except Exception as exc:
            problems.append(f"the canary connection to RabbitMQ was cut: {exc!r}")
        try:
            if int(self.redis.client_id()) != self.redis_client_id:
                problems.append("the canary connection to Redis was cut (it came back as another client)")
        except redis.RedisError as exc:
            problems.append(f"the canary connection to Redis was cut: {exc!r}")
        for kind, names in (self.names() if leftovers else {}).items():
            before = self.before.get(kind)
            if names is None or before is None:
                continue
            left = sorted(names - before)
            if kind == "Redis key":
                left = [key for key in left if self.redis.pttl(key) == -1]
            if left:
                problems.append(f"{len(left)} {kind}(s) left behind: {', '.join(left[:20])}")
        for close in (self.amqp.close, self.redis.close):
            try:
                close()
            except Exception:  # a cut canary, reported above
                pass
        return problems
