"""Where the server runs its calls: the execution policy.

* Inline (``concurrency=1``): the consume loop runs each call itself, in the consuming
  thread, then replies and acks (:meth:`kombu_rpc._consumer.ConsumeLoop._on_request`).
* A thread pool (``concurrency > 1``): :class:`WorkerPool` runs calls in worker
  threads and hands each finished one back to the consuming thread, which alone may
  ack (its channel is not thread-safe).
* ``async def`` functions, either way, run on one asyncio loop in a thread of its own
  (:class:`EventLoop`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import socket
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeAlias

from kombu.message import Message

from . import context
from ._dispatch import Job, PartNotSent, Reply
from ._replies import ACK, REQUEUE, Settlement

#: A finished call: its request, the connection generation it came on, the reply the
#: consuming thread is to publish (``None``: nothing to publish) and, when there is
#: none, what becomes of the request.
Done: TypeAlias = tuple[Message, int, "Reply | None", Settlement]

logger = logging.getLogger("kombu_rpc.server")


class WorkerPool:
    """Runs calls in ``size`` worker threads and queues them, finished, for the
    consuming thread.

    Args:
        size: How many calls run at once.
        run: Runs a call, returning its reply (:meth:`kombu_rpc._dispatch.Dispatcher.run`).
        publish: Publishes a reply from a worker thread
            (:meth:`kombu_rpc._replies.ReplyPublisher.publish_reply`).
        wake_up: Hand replies to the consuming thread, waking it through a socket pair
            (:attr:`wake_r`) that it waits on with its connection's socket (AMQP);
            otherwise workers publish their replies themselves and the consuming thread
            polls.
    """

    def __init__(
        self,
        size: int,
        run: Callable[[Job], Reply | None],
        publish: Callable[[Reply], Settlement],
        wake_up: bool,
    ) -> None:
        self._run = run
        self._publish = publish
        self._size = size
        #: Calls to run, for the workers (``None``: a worker is to stop).
        self._calls: queue.SimpleQueue[tuple[Message, int, Job] | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []  # started as calls find none idle
        #: Guards :attr:`done` and :attr:`in_flight`; notified when a call finishes.
        self.cond = threading.Condition()
        #: Finished calls, in order, for the consuming thread to settle.
        self.done: deque[Done] = deque()
        #: Calls submitted and not yet taken from :attr:`done`.
        self.in_flight = 0
        self.wake_r: socket.socket | None = None  # a worker finished (a byte per run of them)
        self.wake_w: socket.socket | None = None
        if wake_up:
            self.wake_r, self.wake_w = socket.socketpair()
            self.wake_w.setblocking(False)

    def submit(self, message: Message, generation: int, job: Job) -> None:
        """Run ``job`` in a worker thread (from the consuming thread only)."""
        with self.cond:
            self.in_flight += 1
            unfinished = self.in_flight - len(self.done)  # submitted, not yet run to the end
            idle = unfinished <= len(self._workers)
        if not idle and len(self._workers) < self._size:  # as many threads as calls need
            # daemons: a call still running when the process exits (after the server's
            # shutdown_timeout) is given up, its request redelivered
            worker = threading.Thread(
                target=self._serve, name=f"kombu_rpc-worker_{len(self._workers)}", daemon=True
            )
            worker.start()
            self._workers.append(worker)
        self._calls.put((message, generation, job))

    def _serve(self) -> None:
        """A worker: run calls in turn until told to stop. (A plain queue of calls, not a
        ``ThreadPoolExecutor``: no future, work item and semaphore per call.)"""
        while (call := self._calls.get()) is not None:
            self._work(*call)

    def _work(self, message: Message, generation: int, job: Job) -> None:
        # With a wake-up pair (AMQP) the consuming thread publishes the reply, on its
        # channel, confirmed as it reads; otherwise the worker publishes it. The final
        # reply of a call that sent other messages (items, progress) goes after them,
        # on the same connection: the worker's.
        done: Done
        try:
            reply = self._run(job)
        except PartNotSent:  # a stream's item was lost: the request runs again
            done = (message, generation, None, REQUEUE)
        except BaseException:  # a bug: the request is not lost (nor its slot in the pool)
            logger.exception("a worker failed to run a call; its request is requeued")
            done = (message, generation, None, REQUEUE)
        else:
            if reply is None:
                done = (message, generation, None, ACK)
            elif self.wake_w is not None and job[6] is None:
                done = (message, generation, reply, ACK)
            else:
                done = (message, generation, None, self._publish(reply))
        with self.cond:
            # One wake-up for calls finishing in a row: the consuming thread settles
            # every finished call it finds (see ConsumeLoop._settle_finished), so a byte
            # is owed only when it may have found none.
            owed = not self.done
            self.done.append(done)
            self.cond.notify_all()
            if owed and self.wake_w is not None:
                try:
                    self.wake_w.send(b"\0")
                except BlockingIOError:  # full: the loop has wake-ups pending anyway
                    pass

    def take(self) -> Done:
        """The oldest finished call (:attr:`done` must not be empty)."""
        with self.cond:
            done = self.done.popleft()
            self.in_flight -= 1
        return done

    def close(self) -> None:
        """Stop taking calls (those running finish unawaited) and close the socket
        pair; a call still running then publishes its own reply."""
        for _ in self._workers:  # after the calls already queued, which still run
            self._calls.put(None)
        with self.cond:  # a call still running must not write to a closed socket
            wake_r, wake_w, self.wake_r, self.wake_w = self.wake_r, self.wake_w, None, None
        for sock in (wake_r, wake_w):
            if sock is not None:
                sock.close()


class EventLoop:
    """An asyncio loop in a thread of its own, started on first use, for ``async
    def`` functions."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        #: The calls running on the loop, by call id, for :meth:`cancel`.
        self._running: dict[str, Future[Any]] = {}

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coroutine`` on the loop as the current call; block until its result (or
        raise its error; :class:`concurrent.futures.CancelledError` once cancelled)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._event_loop())
        call = context.current_call()
        if call is None:
            return future.result()
        call_id = call.call_id
        self._running[call_id] = future
        try:
            if call.cancelled:  # cancelled before cancel() could find it
                future.cancel()
            return future.result()
        finally:
            self._running.pop(call_id, None)

    def cancel(self, call_id: str) -> None:
        """Cancel the task of call ``call_id``, if it runs on the loop (from any thread)."""
        future = self._running.get(call_id)
        if future is not None:
            future.cancel()  # the loop cancels the task; the waiting thread returns at once

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(
                    target=_run_loop, args=(loop,), name="kombu_rpc-asyncio", daemon=True
                ).start()
                self._loop = loop
            return self._loop

    def stop(self) -> None:
        """Stop the loop, if it runs; the next call starts another."""
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_forever()
    finally:
        loop.close()
