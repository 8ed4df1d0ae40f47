"""Leases on Redis: a server or proxy that dies without deleting its own queues does
not leave them for ever.

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
every :data:`RENEW_EVERY` seconds for :data:`LEASE_TTL` seconds (its cancel listener
holds one on its own queue). At each renewal (the first at start) the consuming loop
also sweeps: it claims the leases that ran out (atomically, so each is swept once),
unbinds their queues and deletes them with kombu's own commands, then drops the
leases. A server that stops deletes its queues and gives its leases up.

A proxy holds a lease on its reply queue in the same way (``sweeps=False``), renewed by
whoever reads its replies (and given up at close, or at interpreter exit): the
replies to its calls in flight when it was killed would stay in its list for ever. A
sweep deletes the list of a proxy whose lease ran out, a proxy's renewal that Redis
refuses is logged at DEBUG only (its servers warn of theirs).

A server's lease runs out only if it did not renew it for :data:`LEASE_TTL` (an hour):
a call that runs inline on the loop for longer, for instance, or a Redis whose clock
jumped. Such a server finds its bindings gone at its next renewal and binds its
queues again, with a warning: the events on direct and topic exchanges published
meanwhile did not reach it (fanout messages go by PUB/SUB, whatever the bindings).

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
#: [exchange, ...]], ...]}`` (``"proxy"`` for a proxy's), scores the time in ms (Redis's
#: clock) they run out.
LEASES = "kombu_rpc.leases"
#: Seconds a lease lasts after its renewal.
LEASE_TTL = 3600.0
#: Seconds between two renewals (and sweeps) of a server's lease.
RENEW_EVERY = 60.0
#: Most leases one sweep takes.
SWEEP_BATCH = 16
#: Seconds a sweep holds the leases it took: one whose sweeper died meanwhile runs out
#: again after that, and the next sweep takes it.
SWEEP_CLAIM = 300.0
#: What every queue named in a lease starts with: a sweep deletes nothing else.
OWN_PREFIX = "kombu_rpc."
#: Who holds leases, and the logger of each one's messages.
ROLES = {"server": "kombu_rpc.server", "proxy": "kombu_rpc.link"}

#: Sets lease ARGV[1] to run out ARGV[2] ms from now, by Redis's clock.
_RENEW = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[1])
"""
#: Claims up to ARGV[1] leases that ran out, by Redis's clock: has them run out ARGV[2]
#: ms from now instead, and returns that time and the leases.
_TAKE = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local taken = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ms, 'LIMIT', 0, tonumber(ARGV[1]))
local claim = ms + tonumber(ARGV[2])
for _, lease in ipairs(taken) do
    redis.call('ZADD', KEYS[1], claim, lease)
end
table.insert(taken, 1, tostring(claim))
return taken
"""
#: Removes lease ARGV[1] if it still runs out at ARGV[2] (claimed by this sweep, not
#: renewed by its server since).
_DROP = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
    redis.call('ZREM', KEYS[1], ARGV[1])
end
"""


class Lease:
    """The lease of server (or proxy, the ``role``) ``holder_id`` on ``queues``: its own
    queues, declared on the channel the lease is renewed on. With ``sweeps``, each
    renewal also sweeps the leases that ran out (one lease per server does)."""

    def __init__(
        self, holder_id: str, queues: Sequence[Queue], sweeps: bool = True, role: str = "server"
    ) -> None:
        self.holder = f"{role} {holder_id}"
        self._logger = logging.getLogger(ROLES[role])
        self._quiet = role == "proxy"  # a refused renewal is the servers' to warn of
        self._queues = list(queues)
        self._sweeps = sweeps
        self._member = json.dumps(
            {
                role: holder_id,
                "queues": [[queue.name, sorted(_exchanges(queue))] for queue in self._queues],
            },
            separators=(",", ":"),
        )
        self._renew_at = 0.0  # (monotonic) when the lease is next renewed
        self._refused = False  # the last renewal failed (logged once in a row)

    def due(self) -> bool:
        """True when the lease is to be renewed."""
        return monotonic() >= self._renew_at

    def renew(self, channel: Any) -> None:
        """Renew the lease for :data:`LEASE_TTL`, bind again any of its queues that
        were swept, and sweep the leases that ran out.

        Any other error of Redis (scripts not allowed, a key of another type) is
        logged, and the lease is tried again at its next turn: a lease must not stop
        a server.

        Raises:
            Exception: Redis's connection errors (the server reconnects).
        """
        self._renew_at = monotonic() + RENEW_EVERY
        try:
            with channel.conn_or_acquire() as client:
                client.register_script(_RENEW)(keys=[LEASES], args=[self._member, round(LEASE_TTL * 1000)])
            self._bind_swept(channel)
            if self._sweeps:
                sweep(channel)
        except Exception as exc:
            if isinstance(exc, channel.connection.connection_errors):
                raise
            self._logger.log(
                logging.DEBUG if self._refused or self._quiet else logging.WARNING,
                "%s could not renew its lease on Redis (trying again every %gs): %s",
                self.holder,
                RENEW_EVERY,
                exc,
                exc_info=not self._refused,
            )
            self._refused = True
        else:
            self._refused = False

    def release(self, channel: Any) -> None:
        """Give the lease up (once its queues were deleted).

        Raises:
            Exception: Redis's connection errors.
        """
        with channel.conn_or_acquire() as client:
            client.zrem(LEASES, self._member)

    def _bind_swept(self, channel: Any) -> None:
        """Bind again the queues whose bindings are gone: a sweep took them while this
        server's loop was held up past its lease.

        Only events on direct and topic exchanges were lost meanwhile: kombu delivers
        fanout messages (broadcasts, cancels, fanout events) by PUB/SUB, whatever
        the binding table holds."""
        tables: dict[str, set[str]] = {}
        for queue in self._queues:
            exchanges = _exchanges(queue)
            for exchange in exchanges:
                if exchange not in tables:
                    tables[exchange] = {entry[-1] for entry in channel.get_table(exchange)}
            if all(queue.name in tables[exchange] for exchange in exchanges):
                continue
            fanout = all(type == "fanout" for type in exchanges.values())
            self._logger.log(
                logging.INFO if fanout else logging.WARNING,
                "%s: its queue %r was unbound by a sweep (its lease was not renewed for %gs); "
                "binding it again%s",
                self.holder,
                queue.name,
                LEASE_TTL,
                "" if fanout else ": the events published meanwhile did not reach it",
            )
            # forget the bindings this connection recorded (and the queue's lists,
            # which nothing was routed to since the sweep), then bind anew
            channel.queue_delete(queue.name)
            queue(channel).declare()


def sweep(channel: Any) -> int:
    """Unbind and delete the queues of up to :data:`SWEEP_BATCH` leases that ran out;
    returns how many leases were swept.

    The leases are claimed first, for :data:`SWEEP_CLAIM`, and removed once their
    queues are gone: a sweep cut short leaves them to the next one. A lease whose
    server renewed it meanwhile (it was late, not dead) is left: that server binds its
    queues again at its next renewal.

    Raises:
        Exception: Redis's connection errors.
    """
    with channel.conn_or_acquire() as client:
        claim, *taken = client.register_script(_TAKE)(
            keys=[LEASES], args=[SWEEP_BATCH, round(SWEEP_CLAIM * 1000)]
        )
        drop = client.register_script(_DROP)
    for member in taken:
        owner, queues = _parse(member)
        for name, exchanges in queues:
            found = False
            for exchange in exchanges:
                for entry in channel.get_table(exchange):
                    if len(entry) == 3 and entry[2] == name:
                        channel._delete(name, exchange, entry[0], entry[1])
                        found = True
            if not found:  # no binding left: its lists only
                channel._delete(name, "", "", "")
        with channel.conn_or_acquire() as client:
            drop(keys=[LEASES], args=[member, claim], client=client)
        if owner is not None:  # a dead server is worth a warning; a proxy, its process ending
            logger.log(
                logging.WARNING if owner.startswith("server ") else logging.INFO,
                "deleted the queues of %s, whose lease on Redis ran out: it did not stop cleanly (%s)",
                owner,
                ", ".join(name for name, _ in queues) or "none",
            )
    return len(taken)


def _parse(member: bytes | str) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """The holder (``"server <id>"``, ``"proxy <id>"``) and the queues (names and
    exchanges) of a lease; ``(None, [])`` for one that is not of this module's making
    (logged): none of its queues is touched."""
    try:
        lease = json.loads(member)
        roles = [role for role in ROLES if role in lease]
        queues = lease["queues"]
        if len(roles) != 1 or not isinstance(lease[roles[0]], str) or not isinstance(queues, list):
            raise ValueError("not the lease of a kombu_rpc server or proxy")
        owner = f"{roles[0]} {lease[roles[0]]}"
        parsed = []
        for name, exchanges in queues:
            if not (
                isinstance(name, str)
                and name.startswith(OWN_PREFIX)
                and isinstance(exchanges, list)
                and all(isinstance(exchange, str) for exchange in exchanges)
            ):
                raise ValueError(f"not a queue of kombu_rpc's: {name!r}")
            parsed.append((name, exchanges))
    except (ValueError, TypeError, KeyError) as exc:
        logger.warning("dropped a malformed lease %r: %s", member, exc)
        return None, []
    return owner, parsed


def _exchanges(queue: Queue) -> dict[str, str]:
    """The exchanges ``queue`` is bound to, by name, with their types (none for the
    default exchange)."""
    exchanges = [binding.exchange for binding in queue.bindings if binding.exchange is not None]
    if queue.exchange is not None:
        exchanges.append(queue.exchange)
    return {exchange.name: exchange.type for exchange in exchanges if exchange.name}


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
