"""Calling from asyncio: AsyncRPCProxy awaits replies without blocking the event loop."""

import asyncio
import threading
import time

from kombu_rpc import AsyncRPCProxy, Registry, RPCServer, RPCTimeout

registry = Registry()
logged = threading.Event()


@registry.remote
def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@registry.remote(name="math.add")
def add(a: float, b: float) -> float:
    return a + b


@registry.remote
def log(text: str) -> None:
    print("server got:", text)
    logged.set()


@registry.remote
def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "awake"


async def main() -> None:
    async with AsyncRPCProxy("memory://", queue="async-demo", timeout=5) as proxy:
        # 1. Await a call: the event loop runs other tasks until the reply arrives.
        print(await proxy.fib(30))  # 832040

        # 2. Dotted names: attribute access or item access.
        print(await proxy.math.add(1, 2), await proxy["math.add"](b=3, a=4))  # 3 7

        # 3. Many calls in flight at once, on one proxy and one reply queue.
        print(await asyncio.gather(*(proxy.fib(n) for n in range(10))))  # [0, 1, 1, 2, ..., 34]

        # 4. call_async: returns an asyncio.Future once the request is sent.
        future = await proxy.fib.call_async(20)
        print(await future)  # 6765

        # 5. cast: fire and forget; returns once the request is sent.
        await proxy.log.cast("hello")
        await asyncio.to_thread(logged.wait, 5)  # wait for the server without blocking the loop

        # 6. options() returns a view of the proxy with another timeout.
        try:
            await proxy.options(timeout=0.2).sleep(1)
        except RPCTimeout as exc:
            print(exc)  # no reply to 'sleep' within 0.2s
        print(await proxy.sleep(0.1))  # awake: the original proxy keeps its 5 s timeout


if __name__ == "__main__":
    # The server runs in a background thread of this process (memory:// is in-process).
    server = RPCServer("memory://", registry=registry, queue="async-demo", concurrency=4)
    with server.running():
        asyncio.run(main())
