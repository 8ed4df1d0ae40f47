"""An event-driven ``memory://`` transport: consumers sleep until a message is put.

kombu's virtual transports poll: an idle ``drain_events`` sleeps
``polling_interval`` (1 s by default) between empty reads, so memory:// is either
slow (long interval) or spins a core (short interval). This subclass keeps kombu's
process-wide memory broker state, and wakes waiting consumers through one condition
whenever a message is put, so it is both fast and idle at zero CPU.

Messages put through kombu's plain memory transport land in the same queues but
do not wake the waiters; they are picked up within ``polling_interval``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from queue import Empty
from time import monotonic
from typing import Any

from kombu.transport import memory


class _PutSignal:
    """A counter bumped on every put, with a condition to wait for it to change."""

    def __init__(self) -> None:
        # Re-entrant: a signal handler may put a message while its thread waits here.
        self._cond = threading.Condition(threading.RLock())
        self.seq = 0

    def bump(self) -> None:
        with self._cond:
            self.seq += 1
            self._cond.notify_all()

    def wait_past(self, seq: int, timeout: float | None) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.seq != seq, timeout)


_signal = _PutSignal()


class Channel(memory.Channel):  # type: ignore[misc]
    """memory:// channel that signals waiting consumers on every put."""

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        super()._put(queue, message, **kwargs)
        _signal.bump()

    def _put_fanout(self, exchange: str, message: Any, routing_key: str | None = None, **kwargs: Any) -> None:
        super()._put_fanout(exchange, message, routing_key, **kwargs)
        _signal.bump()

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> None:
        """Delete the queue, bound or not (kombu's only drops queues with bindings)."""
        if if_empty and self._size(queue):
            return
        super().queue_delete(queue, if_unused=if_unused, if_empty=if_empty, **kwargs)
        self._delete(queue)


class Transport(memory.Transport):  # type: ignore[misc]
    """memory:// transport whose ``drain_events`` blocks instead of polling."""

    Channel = Channel

    @property
    def default_connection_params(self) -> dict[str, Any]:
        """No host to default to (kombu warns when it falls back to 'localhost')."""
        return {}

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        """Deliver one message, waiting up to ``timeout`` seconds for one to be put."""
        deadline = None if timeout is None else monotonic() + timeout
        get: Callable[..., None] = self.cycle.get
        while True:
            seq = _signal.seq
            try:
                get(self._deliver, timeout=timeout)
                return
            except Empty:
                pass
            wait = self.polling_interval
            if deadline is not None:
                remaining = deadline - monotonic()
                if remaining <= 0:
                    raise TimeoutError()
                wait = remaining if wait is None else min(wait, remaining)
            _signal.wait_past(seq, wait)
