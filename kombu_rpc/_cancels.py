"""The calls a server was asked to cancel: a bounded set of call ids that expire.

A server's cancel listener (``kombu_rpc._cancelling.CancelListener``) adds the id of
each call a caller cancelled; the dispatcher drops a request whose id is in the set
instead of running it, a sync function reads
:attr:`CallContext.cancelled <kombu_rpc.context.CallContext.cancelled>`, and the
``on_cancel`` hook cancels a running ``async def`` function's task. No I/O here.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable
from time import monotonic, time

#: Seconds an id is remembered when its call has no deadline (or a later one).
MAX_TTL = 3600.0
#: Most ids remembered; past it, those due to expire first are forgotten.
MAX_IDS = 10_000


class CancelledCalls:
    """A thread-safe set of cancelled call ids, each forgotten at its call's deadline
    (at most :data:`MAX_TTL` seconds on), holding at most :data:`MAX_IDS` of them.

    Args:
        on_cancel: Called with each id added (in the adding thread).
        max_ids: Most ids remembered.
        max_ttl: Longest time an id is remembered, in seconds.
    """

    def __init__(
        self,
        on_cancel: Callable[[str], None] | None = None,
        max_ids: int = MAX_IDS,
        max_ttl: float = MAX_TTL,
    ) -> None:
        self.on_cancel = on_cancel
        self._max_ids = max_ids
        self._max_ttl = max_ttl
        #: The ids, each with the (monotonic) time it is forgotten: ``call_id in ids``
        #: is the plain dict lookup a server makes for every call (no lock needed).
        self.ids: dict[str, float] = {}
        self._expiry = self.ids
        self._heap: list[tuple[float, str]] = []
        self._changed = threading.Condition()

    def add(self, call_id: str, deadline: float | None = None) -> None:
        """Remember ``call_id`` until ``deadline`` (seconds since the epoch, as a
        request's ``x-rpc-deadline``; ``None``: :data:`MAX_TTL`), then call
        ``on_cancel``."""
        now = monotonic()
        ttl = self._max_ttl if deadline is None else min(self._max_ttl, deadline - time())
        expires = now + max(ttl, 0.0)
        with self._changed:
            self._forget(now)
            if self._expiry.get(call_id, -1.0) < expires:
                self._expiry[call_id] = expires
                heapq.heappush(self._heap, (expires, call_id))
            while len(self._expiry) > self._max_ids:
                self._pop()
            self._changed.notify_all()
        if self.on_cancel is not None:
            self.on_cancel(call_id)

    def _forget(self, now: float) -> None:
        """Drop the ids due by ``now`` (under the lock)."""
        while self._heap and self._heap[0][0] <= now:
            self._pop()

    def _pop(self) -> None:
        expires, call_id = heapq.heappop(self._heap)
        if self._expiry.get(call_id) == expires:  # not re-added later with a later expiry
            del self._expiry[call_id]

    def __contains__(self, call_id: object) -> bool:
        """Whether ``call_id`` was cancelled: one dict lookup (an id past its expiry
        may still be found until the next :meth:`add`; its call's deadline has passed
        anyway)."""
        return call_id in self._expiry

    def __len__(self) -> int:
        return len(self._expiry)

    def wait(self, call_id: str, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (``None``: no limit) until ``call_id`` is
        cancelled; returns whether it is."""
        with self._changed:
            return self._changed.wait_for(lambda: call_id in self._expiry, timeout)
