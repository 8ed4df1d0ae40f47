"""Cancelling calls: the caller stops waiting at once, and the server stops the call."""

import asyncio
import threading
from concurrent.futures import CancelledError

from kombu_rpc import AsyncRPCProxy, Registry, RPCProxy, RPCServer, current_call

registry = Registry()
started = threading.Event()
stopped = threading.Event()


# A sync function that runs long checks now and then whether it was cancelled.
@registry.remote
def crunch(steps: int) -> int:
    call = current_call()
    assert call is not None
    started.set()
    done = 0
    for _ in range(steps):
        if call.cancelled:
            stopped.set()
            break  # what it returns now is not sent: nobody waits for it
        done += 1
        call.wait_cancelled(0.01)  # one step of work (or wait for the cancel)
    return done


# An async def function is cancelled: its task gets CancelledError at its next await.
@registry.remote
async def watch() -> None:
    started.set()
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        stopped.set()
        raise


def cancel_a_future(proxy: RPCProxy) -> None:
    future = proxy.crunch.call_async(10_000)
    started.wait(5)
    future.cancel()  # True: the call is cancelled
    try:
        future.result()
    except CancelledError:
        print("cancelled at once")
    stopped.wait(5)
    print("the server stopped crunching")


async def cancel_a_task(broker: str) -> None:
    async with AsyncRPCProxy(broker, queue="cancel-demo") as proxy:
        task = asyncio.create_task(proxy.watch())
        await asyncio.to_thread(started.wait, 5)
        task.cancel()  # the call's task on the server is cancelled too
        try:
            await task
        except asyncio.CancelledError:
            print("task cancelled")
        await asyncio.to_thread(stopped.wait, 5)
        print("the server's task was cancelled")


if __name__ == "__main__":
    with RPCServer("memory://", registry=registry, queue="cancel-demo").running():
        with RPCProxy("memory://", queue="cancel-demo") as proxy:
            cancel_a_future(proxy)
        started.clear()
        stopped.clear()
        asyncio.run(cancel_a_task("memory://"))
