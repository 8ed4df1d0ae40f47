"""Calling styles: blocking calls, futures, casts, dotted names and per-call timeouts."""

import threading
import time

from kombu_rpc import Registry, RPCProxy, RPCServer, RPCTimeout

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


def main() -> None:
    server = RPCServer("memory://", registry=registry, queue="calling-demo", concurrency=4)
    with server.running(), RPCProxy("memory://", queue="calling-demo", timeout=5) as proxy:
        # 1. Blocking call: waits for the reply (up to the proxy's timeout).
        print(proxy.fib(30))  # 832040

        # 2. Dotted names: attribute access or item access.
        print(proxy.math.add(1, 2), proxy["math.add"](b=3, a=4))  # 3 7

        # 3. call_async returns a concurrent.futures.Future; several calls can be in flight.
        futures = [proxy.fib.call_async(n) for n in range(10)]
        print([f.result() for f in futures])  # [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]

        # 4. cast: fire and forget, no reply is sent and nothing is returned.
        proxy.log.cast("hello")
        logged.wait(5)

        # 5. options() returns a view of the proxy with another timeout.
        quick = proxy.options(timeout=0.2)
        try:
            quick.sleep(1)
        except RPCTimeout as exc:
            print(exc)  # no reply to 'sleep' within 0.2s
        print(proxy.sleep(0.1))  # awake: the original proxy keeps its 5 s timeout


if __name__ == "__main__":
    main()
