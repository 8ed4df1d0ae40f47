"""The memory:// link: callers publish inline (a put cannot stall, and it saves a
thread hand-off per call) and read the reply queue in turns."""

from __future__ import annotations

import threading
from typing import Any

from kombu import Producer

from .._pending import _Outgoing
from ..connection import publishing_clone
from ..topology import discard_queue
from .base import Link, consume_replies, send


class MemoryLink(Link):
    """Publishes requests inline, on a connection of its own, and reads the reply queue
    on memory://.

    Takes the arguments of :class:`~kombu_rpc._links.base.Link`.
    """

    keeps_exchanges = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._producer: Producer | None = None  # made by the first submit
        self._inline_lock = threading.Lock()

    def start(self) -> None:
        """Declare and consume the reply queue, and start the link's thread."""
        self._conn.ensure_connection(**self._retry_policy)
        self._consumer = consume_replies(self._conn.channel(), self.reply_queue, self._on_reply, self._accept)
        self._turns.start()

    def submit(self, job: _Outgoing, attended: bool) -> None:
        """Publish ``job`` right here: a put cannot stall."""
        with self._inline_lock:
            if self._producer is None:
                self._producer = Producer(publishing_clone(self._origin, self._confirm), auto_declare=False)
            send(self._producer, job, self._pending, self._retry_policy, self._confirm)
        if not attended:
            self.unattended()

    def _close_reading(self) -> None:
        """Stop the link's thread, delete the reply queue and close the connection."""
        self._turns.stop()
        if self._consumer is not None:
            self._consumer.cancel()
            for queue in self._consumer.queues:
                discard_queue(queue)
        self._conn.release()

    def _close_publishing(self, unanswered: list[tuple[str, str]]) -> None:
        with self._inline_lock:
            if self._producer is not None:
                self._producer.connection.release()
                self._producer = None

    def read(self, timeout: float) -> None:
        """Read what arrives within ``timeout`` seconds."""
        try:
            self._conn.drain_events(timeout=timeout)
        except TimeoutError:
            pass

    def wake(self) -> None:
        """End a read at once."""
        self._conn.transport.wake()
