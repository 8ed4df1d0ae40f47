"""An RPCServer serving remote generators in a process of its own, for the tests of
streams whose server is killed or frozen (tests/integration/test_streaming.py).

Usage: ``python stream_server.py BROKER_URL QUEUE``. It logs to stderr; the line
``server <id> consuming '<queue>' ...`` says it is ready. It stops gracefully on SIGTERM
or SIGINT, and also when its standard input closes, so it does not outlive a test run
that was killed.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator

from kombu_rpc import Registry, RPCServer, current_call


def make_registry() -> Registry:
    reg = Registry()

    @reg.remote
    def ticks(n: int, pause: float) -> Iterator[int]:
        """Yield 0 .. n-1, ``pause`` seconds apart."""
        for i in range(n):
            if i:
                time.sleep(pause)
            yield i

    @reg.remote
    def work(steps: int, pause: float) -> int:
        """Report progress ``steps`` times, ``pause`` seconds apart."""
        call = current_call()
        assert call is not None
        for step in range(steps):
            call.progress(step)
            time.sleep(pause)
        return steps

    return reg


def main(argv: list[str]) -> None:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server = RPCServer(argv[1], registry=make_registry(), queue=argv[2])

    def stop_when_orphaned() -> None:
        sys.stdin.read()  # EOF: the test process closed the pipe, or died
        server.stop()

    threading.Thread(target=stop_when_orphaned, daemon=True).start()
    server.run()


if __name__ == "__main__":
    main(sys.argv)
