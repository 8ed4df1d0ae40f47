"""Servers in their own processes, as users run them.

The child side is ``python -m benchmarks.server_process URL IMPL QUEUE CONCURRENCY``: the
implementation named ``IMPL`` (see :mod:`benchmarks.lineup`) serving the workload on
``QUEUE``. It prints ``ready`` once it consumes and stops on SIGTERM or when its
standard input closes, so a parent that dies without cleaning up (for example when the
suite's watchdog fires) leaves no server behind.

The parent side is :func:`server_processes`; :func:`cpu_seconds` reads a child's CPU
time, so a measurement can count the server's CPU as well as its own.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kombu_rpc import NoServerError, RPCProxy, RPCTimeout

from .brokers import Broker, resolve_brokers
from .lineup import implementation
from .workload import Workload

#: The repository root, so ``-m benchmarks.server_process`` resolves from anywhere.
ROOT = Path(__file__).resolve().parent.parent
#: What a server process prints once it consumes.
READY = b"ready\n"


def main(argv: list[str]) -> int:
    """Serve on ``argv = [URL, IMPL, QUEUE, CONCURRENCY]`` until SIGTERM or stdin closes."""
    url, name, queue, concurrency = argv
    (broker,) = resolve_brokers(url)
    impl = implementation(broker, name, call_timeout=30.0)
    # SIGTERM ends the main thread's wait by raising there (a handler taking a lock the
    # interrupted thread may hold could deadlock); the server stops as the blocks unwind.
    signal.signal(signal.SIGTERM, _exit)

    def stop_when_parent_goes() -> None:
        sys.stdin.read()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_parent_goes, daemon=True).start()
    try:
        with impl.instrumented(), impl.server(Workload(), queue, int(concurrency)):
            sys.stdout.buffer.write(READY)
            sys.stdout.flush()
            while True:
                signal.pause()
    except SystemExit:
        pass
    return 0


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` (a child of this one) used so far, all
    its threads: Linux's CPU clock of another process, in nanoseconds (``/proc``'s
    counts are in 10 ms ticks, too coarse for a short window)."""
    return time.clock_gettime(((~pid) << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)


def wait_ready(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Wait until every process printed :data:`READY`.

    Raises:
        RuntimeError: A process exited or printed something else, or not all were ready
            within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    for process in processes:
        assert process.stdout is not None
        remaining = deadline - time.monotonic()
        readable, _, _ = select.select([process.stdout], [], [], max(0.0, remaining))
        line = process.stdout.readline() if readable else b""
        if line != READY:
            if not readable:
                raise RuntimeError(f"a server process was not ready within {timeout}s")
            raise RuntimeError(f"a server process exited ({process.poll()}) or said {line!r} instead")


def wait_for_servers(proxy: RPCProxy, processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Call ``kombu_rpc.ping`` until every kombu_rpc process answered (distinct server
    ids): ready, and each known to the broker.

    Raises:
        RuntimeError: A server process exited, or not all answered within ``timeout``.
    """
    wait_ready(processes, timeout)
    deadline = time.monotonic() + timeout
    quick = proxy.options(timeout=1.0)
    seen: set[str] = set()
    while len(seen) < len(processes):
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"a server process exited with {process.returncode} before it served")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(seen)} of {len(processes)} servers answered within {timeout}s")
        try:
            seen.add(quick["kombu_rpc.ping"]()["server_id"])
        except (NoServerError, RPCTimeout):
            time.sleep(0.05)


def _stop_all(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM every process, then wait for each (killing one that outlives ``timeout``)."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


@contextmanager
def server_processes(
    broker: Broker, queue: str, count: int, impl: str = "kombu_rpc", concurrency: int = 1
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start ``count`` processes serving ``queue`` with the implementation named ``impl``;
    SIGTERM and wait for them on exit.

    The caller waits for them to serve with :func:`wait_ready` or, for kombu_rpc,
    :func:`wait_for_servers`.
    """
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            command = [
                sys.executable,
                "-m",
                "benchmarks.server_process",
                broker.url,
                impl,
                queue,
                str(concurrency),
            ]
            processes.append(
                subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            )
        yield processes
    finally:
        _stop_all(processes, 30.0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
