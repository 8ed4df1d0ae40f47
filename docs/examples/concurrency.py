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
        futures = [proxy.work.call_async(0.2) for _ in range(4)]
        for future in futures:
            future.result()
        return time.monotonic() - started


if __name__ == "__main__":
    print(f"concurrency=1: {timed(1):.1f}s")  # about 0.8s: one call after the other
    print(f"concurrency=4: {timed(4):.1f}s")  # about 0.2s: four calls at once
