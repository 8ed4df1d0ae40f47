"""Which brokers to run on, unique queue names, and deleting the queues a run created."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from kombu import Connection

logger = logging.getLogger(__name__)

#: Broker names accepted by ``--broker`` and the URL each one stands for.
ALIASES: dict[str, str] = {
    "memory": "memory://",
    "amqp": "amqp://guest:guest@127.0.0.1:5672//",
    "redis": "redis://127.0.0.1:6379/0",
}
#: Broker kinds the suite knows how to clean up after (kombu's ``driver_type``).
KINDS = ("memory", "amqp", "redis")


@dataclass(frozen=True)
class Broker:
    """A broker to benchmark on: its kind (``memory``, ``amqp`` or ``redis``) and URL."""

    name: str
    url: str

    @property
    def in_process(self) -> bool:
        """True for ``memory://``, which other processes cannot reach."""
        return self.name == "memory"


def resolve_brokers(spec: str) -> list[Broker]:
    """Turn ``--broker`` text (comma-separated names or URLs) into brokers.

    Raises:
        ValueError: A URL names a transport other than memory, AMQP or Redis, or the
            same kind of broker is given twice.
    """
    brokers: list[Broker] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        url = ALIASES.get(item, item)
        try:
            kind = Connection(url).transport.driver_type
        except Exception as exc:
            raise ValueError(f"cannot use broker {item!r}: {exc}") from exc
        if kind not in KINDS:
            raise ValueError(f"broker {item!r} is {kind!r}; the suite runs on {', '.join(KINDS)}")
        if any(b.name == kind for b in brokers):
            raise ValueError(f"broker kind {kind!r} given twice")
        brokers.append(Broker(kind, url))
    if not brokers:
        raise ValueError("no broker given")
    return brokers


def check_reachable(broker: Broker, timeout: float = 5.0) -> str | None:
    """Return why ``broker`` cannot be reached, or ``None`` if it can."""
    if broker.in_process:
        return None
    try:
        with Connection(broker.url, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return f"{exc!r}"
    return None


def unique_queue(role: str = "q") -> str:
    """A queue name no one else uses: ``bench.<role>.<uuid>``."""
    return f"bench.{role}.{uuid.uuid4().hex}"


def delete_queues(broker: Broker, names: list[str]) -> None:
    """Delete queues this run declared (and, on Redis and memory, purge them first:
    a Redis queue is a list that deleting the kombu queue alone would leave behind).

    Failures are logged, never raised: cleanup must not hide a benchmark's result.
    """
    if not names:
        return
    try:
        with Connection(broker.url, connect_timeout=5) as conn:
            channel = conn.channel()
            for name in names:
                if broker.name != "amqp":
                    channel.queue_purge(name)
                channel.queue_delete(name)
    except Exception as exc:
        logger.warning("could not delete queues %s on %s: %r", names, broker.name, exc)
