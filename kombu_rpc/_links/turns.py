"""Who reads a proxy's connection, and when: the waiting callers, in turn, or the
link's thread.

A caller waiting for a result reads the connection itself while nobody else does (it
*leads*); other waiting callers *follow*, and are woken when the leader has read
something or leaves. The link's own thread reads only when nobody waits but calls are
in flight (``call_async``, asyncio), or when only it may read (a reconnect). So a
sequential call costs no thread hand-off.

:class:`Turns` is this logic alone, pure threading: what a read is, and what the
link's thread does in its turn, are its :class:`Reader`'s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from time import monotonic
from typing import Protocol

logger = logging.getLogger("kombu_rpc.link")  # the name the guide documents

#: Longest time anyone blocks reading a connection, and the idle check's period.
IDLE_WAIT = 1.0
#: How long the link's thread leaves the calls a caller will come back for (a
#: ``map``'s, between two results) to that caller before it reads for them itself: a
#: caller away for longer could otherwise find calls timed out whose replies came.
AWAY_WAIT = 0.05
#: Longest wait for the link's thread to end at close.
STOP_WAIT = 10.0


class Closed(Exception):
    """Raised by a reader's :meth:`~Reader.work` (in a reconnect's retries) to end the
    link's thread once the link closes."""


class Reader(Protocol):
    """What :class:`Turns` needs of the connection it shares out."""

    def read(self, timeout: float) -> None:
        """Read what arrives within ``timeout`` seconds (the leader only)."""

    def work(self, timeout: float) -> None:
        """The link thread's turn: reconnect, or read for up to ``timeout`` seconds
        (0: take what has come anyway, without waiting)."""

    def wake(self) -> None:
        """Make a leader's :meth:`read` return early."""

    def has_work(self) -> bool:
        """True while calls are in flight that somebody has to read for."""

    def awaited(self) -> bool:
        """True while calls are in flight that a caller will come back to read for."""

    def must_act(self) -> bool:
        """True while only the link's thread may read (a reconnect)."""


class Turns:
    """Takes turns reading one connection: waiting callers, or the link's thread.

    Args:
        reader: Reads the connection, and does the link thread's work.
        callers_read: Whether waiting callers read the connection themselves; if not,
            the link's thread reads whenever calls are in flight and callers only wait.
        name: The link thread's name.
    """

    def __init__(self, reader: Reader, *, callers_read: bool = True, name: str = "kombu_rpc-link") -> None:
        self._reader = reader
        self.callers_read = callers_read
        self._name = name
        self._turn = threading.Lock()  # who reads: guards the fields below
        self._followers = threading.Condition(self._turn)
        self._idle = threading.Condition(self._turn)  # the link's thread waits here
        #: Who reads now: a waiting caller, the link's thread, or nobody (``None``).
        self.leader: object | None = None
        self._waiting = 0  # callers in wait(), leading or following
        self._left_at = monotonic()  # when the last caller in wait() left it
        self._short_naps = False  # the link's thread looks every AWAY_WAIT (see _run)
        #: True once :meth:`stop` was called.
        self.closing = False
        self._thread: threading.Thread | None = None

    def wait(self, done: Callable[[], bool], timeout: float | None) -> None:
        """Return once ``done()`` or after ``timeout`` seconds, reading the connection
        whenever nobody else does (what the reader raises ends the wait)."""
        deadline = None if timeout is None else monotonic() + timeout
        me = object()
        reader = self._reader
        with self._turn:
            self._waiting += 1
        try:
            while not done():
                remaining = IDLE_WAIT if deadline is None else min(IDLE_WAIT, deadline - monotonic())
                if remaining <= 0:
                    return
                with self._turn:
                    if not self.callers_read:
                        self._idle.notify()  # the link's thread reads for this call
                    if self.leader is not None or reader.must_act() or self.closing or not self.callers_read:
                        if not done():  # checked under the lock: a wake-up cannot slip by
                            self._followers.wait(remaining)
                        continue
                    self.leader = me
                try:
                    reader.read(remaining)
                finally:
                    self._leave()
        finally:
            with self._turn:
                self._waiting -= 1
                if self._waiting == 0:
                    self._left_at = monotonic()
                    # the link's thread has to act, or to start looking whether this
                    # caller stays away from the calls it will come back for
                    if self.leader is None and (
                        self._needs_thread() or (not self._short_naps and reader.awaited())
                    ):
                        self._idle.notify()

    def unattended(self) -> None:
        """A call was sent that nobody waits on: have the link's thread read, if idle."""
        with self._turn:
            if self.leader is None and self._waiting == 0:
                self._idle.notify()

    def wake_waiters(self) -> None:
        """Have waiting callers look at their calls again (after they were failed)."""
        with self._turn:
            self._followers.notify_all()

    def notify_thread(self) -> None:
        """Have the link's thread look again whether it has to act (a lost connection)."""
        with self._turn:
            self._idle.notify()

    def wait_closing(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for :meth:`stop`; True if it was called."""
        with self._turn:
            return self._idle.wait_for(lambda: self.closing, timeout)

    def check_closing(self) -> None:
        """Raise :class:`Closed` once :meth:`stop` was called (to abandon a reconnect)."""
        if self.closing:
            raise Closed()

    def start(self) -> None:
        """Start the link's thread."""
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> bool:
        """Stop the link's thread, and wait (briefly) until no caller reads any more;
        False if the thread did not end within :data:`STOP_WAIT`."""
        with self._turn:
            self.closing = True
            self._idle.notify_all()
            self._followers.notify_all()
        self._reader.wake()
        if self._thread is not None:
            self._thread.join(STOP_WAIT)
            if self._thread.is_alive():  # in a poll nothing bounds (a locked database)
                logger.warning("the link's thread is stuck reading; leaving it and its connection behind")
                return False
        with self._turn:
            self._followers.wait_for(lambda: self.leader is None, IDLE_WAIT)
        return True

    def _leave(self) -> None:
        """Give up the lead: wake the followers, or the link's thread if it is needed."""
        with self._turn:
            self.leader = None
            self._followers.notify_all()
            if self._needs_thread():
                self._idle.notify()

    def _needs_thread(self) -> bool:
        """True when the link's thread has to act: a reconnect, calls in flight nobody
        reads for (those a caller will come back for, once it stayed away for
        :data:`AWAY_WAIT`), or (where callers do not read) anyone waiting, for a
        broadcast too."""
        reader = self._reader
        if self.closing or reader.must_act():
            return True
        if self._waiting > 0:
            return not self.callers_read
        return reader.has_work() or (reader.awaited() and monotonic() - self._left_at >= AWAY_WAIT)

    def _run(self) -> None:
        me = object()
        reader = self._reader
        idle_check = monotonic() + IDLE_WAIT  # when to look at the idle connection
        while True:
            with self._turn:
                if self.leader is not None or not self._needs_thread():
                    # While a caller will come back for calls in flight, look every
                    # AWAY_WAIT whether it stayed away (nothing notifies that).
                    self._short_naps = reader.awaited()
                    wait = AWAY_WAIT if self._short_naps else IDLE_WAIT
                    self._idle.wait(max(0.0, min(wait, idle_check - monotonic())))
                if self.closing:
                    return
                if self.leader is not None or (self._waiting and self.callers_read and not reader.must_act()):
                    continue  # a caller reads
                busy = self._needs_thread()
                if not busy and monotonic() < idle_check:
                    continue  # the caller came back in time
                self.leader = me
            idle_check = monotonic() + IDLE_WAIT
            failed = False
            try:
                reader.work(IDLE_WAIT if busy else 0)
            except Closed:
                return
            except Exception:  # a bug must not end the thread calls nobody waits on need
                logger.exception("the link's thread failed; it goes on in %gs", IDLE_WAIT)
                failed = True
            finally:
                self._leave()
            if failed:
                with self._turn:
                    self._idle.wait_for(lambda: self.closing, IDLE_WAIT)
