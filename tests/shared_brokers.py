"""What a test run does to the brokers other programs share (RabbitMQ on 5672, Redis on
6379): it must leave their clients connected and leave nothing of its own behind.

:class:`Watch` opens a canary connection to each shared broker before the run; after
it, the canaries must still be the same, unbroken connections. ``tests/conftest.py``
checks them when ``KOMBU_RPC_CHECK_SHARED_BROKERS`` is ``canary``, and also what the
run left behind when it is ``1`` (as CI sets it).

Other programs use the shared brokers meanwhile, among them other runs of this suite,
whose names look just like ours. So the run tags its names: :func:`tag_ids` makes every
id that kombu_rpc makes in this process (:func:`kombu_rpc.topology.new_id`: request
queue names from :func:`~kombu_rpc.testing.unique_queue_name`, reply queues, server ids
and so control and broadcast queues, correlation ids) start with the run's random
tag. What carries the tag after the run is this run's, and fails it: a RabbitMQ queue,
exchange or binding, a Redis key without a time to live (one with a TTL expires by
itself), or a lease naming one of the run's queues on Redis (a sweep takes it only an
hour later). New names that look like the suite's but lack the tag are another program's,
or were made by a process the suite started (their ids are not tagged); they are
reported, without failing the run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from amqp import Connection as AmqpConnection

import kombu_rpc.topology
from kombu_rpc._transports.leases import LEASES

#: Names the suite gives its queues, exchanges and keys (kombu_rpc's own, the tests'),
#: including kombu's Redis binding tables of the suite's exchanges.
OWN_PREFIXES = (
    "kombu_rpc.",
    "test.",
    "ci.",
    "_kombu.binding.kombu_rpc.",
    "_kombu.binding.test.",
    "_kombu.binding_permanent.kombu_rpc.",
    "_kombu.binding_permanent.test.",
)
AMQP_HOST, REDIS_URL = "127.0.0.1:5672", "redis://127.0.0.1:6379/0"
#: How long the run's leftovers may take to go (exclusive queues of connections still
#: closing, auto-delete exchanges) before they count.
SETTLE = 10.0

#: What ``rabbitmqctl list_*`` lists, and its columns.
RABBIT_LISTS = {
    "RabbitMQ queue": ("list_queues", ["name"]),
    "RabbitMQ exchange": ("list_exchanges", ["name"]),
    "RabbitMQ binding": ("list_bindings", ["source_name", "destination_name", "routing_key"]),
}


def tag_ids(tag: str) -> None:
    """Make :func:`kombu_rpc.topology.new_id` return ids that start with ``tag`` (hex
    digits), in this process, also where a module imported it by name."""
    original = kombu_rpc.topology.new_id
    random_digits = 32 - len(tag)

    def tagged_id() -> str:
        return tag + os.urandom(random_digits // 2).hex()

    tagged_id.__doc__ = original.__doc__
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("kombu_rpc", "tests") and getattr(module, "new_id", None) is original:
            module.new_id = tagged_id  # type: ignore[attr-defined]


def rabbit_list(what: str, columns: list[str]) -> list[str] | None:
    """One line per item on the shared RabbitMQ, its columns joined by spaces (``None``:
    cannot list). Bindings of the default exchange (each queue has one) are left out."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return None
    done = subprocess.run([ctl, "-q", what, *columns], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return None
    rows = [line.split("\t") for line in done.stdout.splitlines()[1:]]
    if what == "list_bindings":
        rows = [row for row in rows if row[0]]
    return [" ".join(row) for row in rows]


@dataclass
class Watch:
    """Canaries on the shared brokers, and the run's tag (see the module's docstring)."""

    amqp: AmqpConnection
    redis: redis.Redis
    redis_client_id: int
    tag: str = ""
    before: dict[str, set[str] | None] = field(default_factory=dict)

    @classmethod
    def start(cls, tag_run: bool = True) -> Watch:
        """Open the canaries; with ``tag_run``, tag this run's ids and note the names
        like the suite's already there."""
        amqp = AmqpConnection(AMQP_HOST, userid="guest", password="guest", heartbeat=0, connect_timeout=5)
        amqp.connect()
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=10, single_connection_client=True)
        client.client_setname("kombu_rpc-canary")
        watch = cls(amqp, client, int(client.client_id()))
        if tag_run:
            watch.tag = os.urandom(4).hex()
            tag_ids(watch.tag)
            watch.before = watch.names(lambda name: name.startswith(OWN_PREFIXES))
        return watch

    def names(self, own: Callable[[str], bool], redis_match: str = "*") -> dict[str, set[str] | None]:
        """The items on the shared brokers for which ``own`` is true, by kind (``None``:
        cannot list); Redis keys with a time to live are left out."""
        keys = [key.decode() for key in self.redis.scan_iter(match=redis_match, count=1000)]
        leases = [member.decode() for member in self.redis.zrange(LEASES, 0, -1)]
        found: dict[str, set[str] | None] = {
            "Redis key": {key for key in keys if own(key) and self.redis.pttl(key) == -1},
            # a server's or proxy's lease, which a sweep would only take in an hour
            "Redis lease": {member for member in leases if own(member)},
        }
        for kind, (what, columns) in RABBIT_LISTS.items():
            rows = rabbit_list(what, columns)
            found[kind] = None if rows is None else {row for row in rows if own(row)}
        return found

    def leftovers(self, settle: float = SETTLE) -> dict[str, set[str]]:
        """The run's items still on the shared brokers, once they had ``settle``
        seconds to go."""
        deadline = time.monotonic() + settle
        while True:
            found = self.names(lambda name: self.tag in name, f"*{self.tag}*")
            left = {kind: names for kind, names in found.items() if names}
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.5)

    def foreign(self) -> dict[str, set[str]]:
        """New items named like the suite's, without this run's tag."""
        found = self.names(lambda name: name.startswith(OWN_PREFIXES) and self.tag not in name)
        return {
            kind: names - (self.before.get(kind) or set())
            for kind, names in found.items()
            if names and names - (self.before.get(kind) or set())
        }

    def finish(self, leftovers: bool = True) -> tuple[list[str], list[str]]:
        """What is wrong after the run (canaries cut; with ``leftovers``, the run's items
        left behind), and notes (new items like the suite's, not of this run)."""
        problems, notes = [], []
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
        if leftovers and self.tag:
            for kind, names in self.leftovers().items():
                shown = sorted(names)
                problems.append(f"{len(shown)} {kind}(s) of this run left behind: {', '.join(shown[:20])}")
            for kind, names in self.foreign().items():
                shown = sorted(names)
                notes.append(
                    f"{len(shown)} new {kind}(s) named like the suite's, not of this run (another "
                    f"program's, or a process the suite started): {', '.join(shown[:10])}"
                )
        for close in (self.amqp.close, self.redis.close):
            try:
                close()
            except Exception:  # a cut canary, reported above
                pass
        return problems, notes
