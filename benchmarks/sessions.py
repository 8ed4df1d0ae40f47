"""One measurement's server and client: :func:`serving`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .brokers import delete_queues, unique_queue
from .implementations import Implementation, Session
from .server_process import server_processes, wait_ready
from .workload import Workload


@contextmanager
def serving(
    impl: Implementation, workload: Workload, concurrency: int, own_process: bool = False
) -> Iterator[Session]:
    """Serve ``workload`` with ``impl`` on a fresh queue (deleted afterwards),
    ``concurrency`` calls at a time, and yield a session to call it.

    With ``own_process``, the server runs in a process of its own (serving a workload of
    its own: ``workload`` stays untouched); otherwise in a thread of this one.
    """
    queue = unique_queue()
    server = (
        _in_process(impl, queue, concurrency)
        if own_process
        else _in_thread(impl, workload, queue, concurrency)
    )
    try:
        with impl.instrumented(), server as pid:
            client = impl.client(queue)
            try:
                yield Session(client, impl.clients(client, queue), pid)
            finally:
                client.close()
    finally:
        delete_queues(impl.broker, [queue])


@contextmanager
def _in_thread(impl: Implementation, workload: Workload, queue: str, concurrency: int) -> Iterator[None]:
    with impl.server(workload, queue, concurrency):
        yield None


@contextmanager
def _in_process(impl: Implementation, queue: str, concurrency: int) -> Iterator[int]:
    with server_processes(impl.broker, queue, 1, impl.name, concurrency) as (process,):
        wait_ready([process], timeout=60.0)
        yield process.pid
