"""kombu_rpc servers in their own processes, for the process and memory scenarios.

The child side is ``python -m benchmarks.server_process URL QUEUE [noconfirm]``: an
:class:`~kombu_rpc.RPCServer` serving the workload with ``run()`` (with
``confirm_publish=False`` if asked), which stops on SIGTERM. It also stops when its
standard input closes, so a parent that dies without
cleaning up (for example when the suite's watchdog fires) leaves no server behind.

The parent side is :func:`server_processes`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kombu_rpc import NoServerError, Registry, RPCProxy, RPCServer, RPCTimeout

from .brokers import Broker
from .workload import Workload

#: The repository root, so ``-m benchmarks.server_process`` resolves from anywhere.
ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    """Serve the workload on ``argv = [URL, QUEUE, ("noconfirm")]`` until SIGTERM or
    stdin closes."""
    url, queue, *options = argv
    registry = Registry()
    for name, func in Workload().handlers().items():
        registry.remote(name=name)(func)
    confirm = "noconfirm" not in options
    server = RPCServer(url, registry=registry, queue=queue, concurrency=1, confirm_publish=confirm)

    def stop_when_parent_goes() -> None:
        sys.stdin.read()
        server.stop()

    threading.Thread(target=stop_when_parent_goes, daemon=True).start()
    server.run()
    return 0


def wait_for_servers(proxy: RPCProxy, processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Call ``kombu_rpc.ping`` until every process answered (distinct server ids).

    Raises:
        RuntimeError: A server process exited, or not all answered within ``timeout``.
    """
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
        if process.stdin is not None:
            process.stdin.close()


@contextmanager
def server_processes(
    broker: Broker, queue: str, count: int, confirm_publish: bool = True
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start ``count`` server processes on ``queue``; SIGTERM and wait for them on exit.

    The caller waits for them to serve with :func:`wait_for_servers`.
    """
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.server_process",
                        broker.url,
                        queue,
                        *([] if confirm_publish else ["noconfirm"]),
                    ],
                    cwd=ROOT,
                    stdin=subprocess.PIPE,
                )
            )
        yield processes
    finally:
        _stop_all(processes, 30.0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
