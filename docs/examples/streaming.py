"""Streamed results, progress and idle timeouts (docs/streaming.md)."""

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

from kombu_rpc import AsyncRPCProxy, IdleTimeout, Registry, RemoteError, RPCProxy, RPCServer, current_call

registry = Registry()


# -- serving ---------------------------------------------------------------------------
@registry.remote
def count(n: int) -> Iterator[int]:
    """A remote generator: each item goes to the caller as soon as it is yielded."""
    yield from range(n)


@registry.remote
async def ticks(n: int) -> AsyncIterator[str]:
    """async def generators stream too."""
    for i in range(n):
        await asyncio.sleep(0.01)
        yield f"tick {i}"


@registry.remote(expected=ValueError)  # logged without a traceback: part of its contract
def risky(n: int) -> Iterator[int]:
    yield from range(n)
    raise ValueError("out of data")


@registry.remote
def long_job(steps: int) -> str:
    """A long call reports its progress."""
    call = current_call()
    assert call is not None
    for step in range(steps):
        time.sleep(0.2)  # quiet for a while: keepalives tell the caller it is alive
        call.progress({"done": step + 1, "of": steps})
    return "finished"


# -- calling ---------------------------------------------------------------------------
def streaming(proxy: RPCProxy) -> None:
    # 1. Iterate over a remote generator's items as they come.
    for item in proxy.count.stream(3):
        print(item)  # 0, 1, 2

    # 2. A plain call of a generator function returns its items as a list.
    print(proxy.count(3))  # [0, 1, 2]

    # 3. A failure mid-stream raises after the items sent before it.
    received = []
    try:
        for item in proxy.risky.stream(2):
            received.append(item)
    except RemoteError as exc:
        print(received, exc)  # [0, 1] ValueError: out of data

    # 4. Stop early: breaking out ends the call here at once; later items are dropped.
    for item in proxy.count.stream(100):
        if item == 2:
            break
    with proxy.count.stream(10) as stream:  # or close it explicitly
        print(next(stream), next(stream))  # 0 1


def progress(proxy: RPCProxy) -> None:
    # 5. Progress: the callback gets what the function reports; an idle timeout fails
    #    the call only if the server goes quiet (keepalives come while it runs).
    def show(value: dict[str, int]) -> None:
        print(f"progress {value['done']}/{value['of']}")

    watched = proxy.options(on_progress=show, idle_timeout=0.1)
    print(watched.long_job(3))  # progress 1/3, 2/3, 3/3, then: finished


def idle(proxy: RPCProxy) -> None:
    # 6. Nobody answers (no server on this queue): noticed after the idle timeout,
    #    long before the 30 s deadline.
    nobody = RPCProxy("memory://", queue="streaming-nobody", timeout=30, idle_timeout=0.2)
    with nobody:
        try:
            list(nobody.count.stream(3))
        except IdleTimeout as exc:
            print(exc)  # nothing heard about 'count' for 0.2s (idle_timeout)


async def asynchronous() -> None:
    # 7. async for, on AsyncRPCProxy.
    async with AsyncRPCProxy("memory://", queue="streaming-demo") as proxy:
        async for tick in proxy.ticks.stream(2):
            print(tick)  # tick 0, tick 1


if __name__ == "__main__":
    with RPCServer("memory://", registry=registry, queue="streaming-demo").running():
        with RPCProxy("memory://", queue="streaming-demo", timeout=10) as proxy:
            streaming(proxy)
            progress(proxy)
            idle(proxy)
        asyncio.run(asynchronous())
