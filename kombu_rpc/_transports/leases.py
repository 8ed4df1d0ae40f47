"""Leases on Redis: a server that dies without deleting its own queues does not leave
them bound for ever.

On RabbitMQ a server's own queues (control, broadcasts, cancels, and the queues of its
event subscriptions without a group) are exclusive: they go with its connection.
Redis has nothing of the kind: kombu keeps a queue's bindings in a set per exchange
(``_kombu.binding.<exchange>``) and its messages in a list. A server killed before it
deleted its queues (``kill -9``, a lost machine) leaves them bound, and the list of an
event subscription on a direct or topic exchange fills with every event it matches,
read by nobody.

So a server on Redis holds a lease on its queues: a member of one sorted set,
:data:`LEASES`, naming the server and its queues, scored by the time (on Redis's
clock) until which the server vouches for them. Its consuming loop renews the lease
every :data:`RENEW_EVERY` seconds for :data:`LEASE_TTL` seconds. At each renewal
(the first at start) the server also sweeps: it takes the leases that ran out
(atomically, so each is swept once), unbinds their queues and deletes them with
kombu's own commands. A server that stops deletes its queues and gives its lease up.

A lease runs out only if its server's loop did not renew it for :data:`LEASE_TTL`
(an hour, as long as kombu keeps a consumer's bindings without a refresh): a call
that runs inline on the loop for longer, for instance. Such a server finds its
bindings gone at its next renewal and binds its queues again, with a warning: the
events and broadcasts published meanwhile did not reach it.

Sweeping uses two methods of kombu's Redis channel: ``get_table`` (the bindings of an
exchange) and the private ``_delete`` (unbind a queue and delete its lists), checked
at import (:func:`check`). Without them, or with the transport option
``global_keyprefix`` (whose prefixing of Lua script keys differs between kombu
versions), servers hold no leases and what a killed server left stays, as before.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Sequence
from time import monotonic
from typing import Any

from kombu import Queue
from kombu.transport import redis as kombu_redis

logger = logging.getLogger("kombu_rpc.server")

#: The sorted set of the leases: members are JSON ``{"server": id, "queues": [[name,
#: [exchange, ...]], ...]}``, scores the time in ms (Redis's clock) they run out.
LEASES = "kombu_rpc.leases"
#: Seconds a lease lasts after its renewal.
LEASE_TTL = 3600.0
#: Seconds between two renewals (and sweeps) of a server's lease.
RENEW_EVERY = 60.0
#: Most leases one sweep takes.
SWEEP_BATCH = 16

#: Sets lease ARGV[1] to run out ARGV[2] ms from now, by Redis's clock.
_RENEW = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[1])
"""
#: Removes and returns up to ARGV[1] leases that ran out, by Redis's clock, or with
#: ARGV[2] (a lease's start, ``{"server":"<id>",``) every lease of that server.
_TAKE = """
local taken = {}
if ARGV[2] == '' then
    local now = redis.call('TIME')
    local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    taken = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ms, 'LIMIT', 0, tonumber(ARGV[1]))
else
    for _, lease in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
        if string.sub(lease, 1, string.len(ARGV[2])) == ARGV[2] then
            table.insert(taken, lease)
        end
    end
end
for _, lease in ipairs(taken) do
    redis.call('ZREM', KEYS[1], lease)
end
return taken
"""


class Lease:
    """Server ``server_id``'s lease on ``queues``: its own queues, declared on the
    channel the lease is renewed on."""

    def __init__(self, server_id: str, queues: Sequence[Queue]) -> None:
        self.server_id = server_id
        self._queues = list(queues)
        self._member = json.dumps(
            {
                "server": server_id,
                "queues": [[queue.name, sorted(_exchanges(queue))] for queue in self._queues],
            },
            separators=(",", ":"),
        )
        self._renew_at = 0.0  # (monotonic) when the lease is next renewed

    def due(self) -> bool:
        """True when the lease is to be renewed."""
        return monotonic() >= self._renew_at

    def renew(self, channel: Any) -> None:
        """Renew the lease for :data:`LEASE_TTL`, bind again any of its queues that
        were swept, and sweep the leases that ran out.

        Any other error of Redis (a script refused, a key of another type) is logged,
        and the lease is tried again at its next turn: a lease must not stop a server.

        Raises:
            Exception: Redis's connection errors (the server reconnects).
        """
        self._renew_at = monotonic() + RENEW_EVERY
        try:
            with channel.conn_or_acquire() as client:
                client.register_script(_RENEW)(keys=[LEASES], args=[self._member, round(LEASE_TTL * 1000)])
            self._bind_swept(channel)
            sweep(channel)
        except Exception as exc:
            if isinstance(exc, channel.connection.connection_errors):
                raise
            logger.warning(
                "server %s could not renew its lease on Redis: %s", self.server_id, exc, exc_info=True
            )

    def release(self, channel: Any) -> None:
        """Give the lease up (once its queues were deleted).

        Raises:
            Exception: Redis's connection errors.
        """
        with channel.conn_or_acquire() as client:
            client.zrem(LEASES, self._member)

    def _bind_swept(self, channel: Any) -> None:
        """Bind again the queues whose bindings are gone: a sweep took them while this
        server's loop was held up past its lease."""
        tables: dict[str, set[str]] = {}
        for queue in self._queues:
            exchanges = _exchanges(queue)
            for exchange in exchanges:
                if exchange not in tables:
                    tables[exchange] = {entry[-1] for entry in channel.get_table(exchange)}
            if all(queue.name in tables[exchange] for exchange in exchanges):
                continue
            logger.warning(
                "server %s: the bindings of its queue %r were swept (its loop did not renew "
                "its lease for %gs); binding it again: what was published meanwhile did not reach it",
                self.server_id,
                queue.name,
                LEASE_TTL,
            )
            channel.queue_delete(queue.name)  # forget the bindings this connection recorded
            queue(channel).declare()


def sweep(channel: Any, server: str | None = None) -> int:
    """Unbind and delete the queues of up to :data:`SWEEP_BATCH` leases that ran out,
    or with ``server`` those of every lease of that server (one known to be dead: its
    process was killed); returns how many leases were swept.

    Raises:
        Exception: Redis's connection errors.
    """
    start = "" if server is None else json.dumps({"server": server}, separators=(",", ":"))[:-1] + ","
    with channel.conn_or_acquire() as client:
        taken = client.register_script(_TAKE)(keys=[LEASES], args=[SWEEP_BATCH, start])
    for member in taken:
        try:
            lease = json.loads(member)
            owner, queues = lease["server"], lease["queues"]
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("dropped a malformed lease %r: %s", member, exc)
            continue
        for name, exchanges in queues:
            found = False
            for exchange in exchanges:
                for routing_key, pattern, queue in channel.get_table(exchange):
                    if queue == name:
                        channel._delete(name, exchange, routing_key, pattern)
                        found = True
            if not found:  # no binding left: its lists only
                channel._delete(name, "", "", "")
        logger.warning(
            "deleted the queues of server %s, whose lease on Redis ran out: it did not stop cleanly (%s)",
            owner,
            ", ".join(name for name, _ in queues),
        )
    return len(taken)


def _exchanges(queue: Queue) -> set[str]:
    """The names of the exchanges ``queue`` is bound to (none for the default one)."""
    names = {binding.exchange.name for binding in queue.bindings if binding.exchange is not None}
    if queue.exchange is not None:
        names.add(queue.exchange.name)
    return {name for name in names if name}


def usable(channel: Any) -> bool:
    """True if leases work on ``channel``: a kombu Redis channel without a
    ``global_keyprefix``, whose sweep methods :func:`check` found."""
    return _PROBLEM is None and not getattr(channel, "global_keyprefix", "")


def check() -> str | None:
    """``None`` if kombu's Redis channel has the methods a sweep uses, as it takes
    them; else what is wrong."""
    base = kombu_redis.Channel
    for name, params in (
        ("get_table", ["self", "exchange"]),
        ("_delete", ["self", "queue", "exchange", "routing_key", "pattern"]),
        ("conn_or_acquire", ["self", "client"]),
    ):
        method = getattr(base, name, None)
        if not callable(method):
            return f"kombu.transport.redis.Channel lacks {name}"
        found = list(inspect.signature(method).parameters)[: len(params)]
        if found != params:
            return f"kombu.transport.redis.Channel.{name} takes {found}"
    return None


_PROBLEM = check()
if _PROBLEM is not None:
    logger.warning("servers on Redis hold no leases on their queues: %s", _PROBLEM)
