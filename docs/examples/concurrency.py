"""concurrency=N runs up to N calls at once in a thread pool (and prefetches N requests)."""

import time

from kombu_rpc import Registry, RPCProxy, RPCServer

registry = Registry()


@registry.remote
def work(seconds: float) -> float:
    time.sleep(seconds)  # stands in for I/O-bound work
    return seconds


def timed(concurrency: int) -> float:
    queue = f"concurrency-{concurrency}"
    server = RPCServer("memory://", registry=registry, queue=queue, concurrency=concurrency)
    with server.running(), RPCProxy("memory://", queue=queue) as proxy:
        started = time.monotonic()
        # four calls in flight at once; their results in order
        assert list(proxy.work.map([0.2] * 4, window=4)) == [0.2] * 4
        return time.monotonic() - started


if __name__ == "__main__":
    print(f"concurrency=1: {timed(1):.1f}s")  # about 0.8s: one call after the other
    print(f"concurrency=4: {timed(4):.1f}s")  # about 0.2s: four calls at once
