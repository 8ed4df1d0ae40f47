"""Graceful stop: stop() lets the call in flight finish and send its reply."""

import threading
import time

from kombu_rpc import Registry, RPCProxy, RPCServer

registry = Registry()
started = threading.Event()


@registry.remote
def slow() -> str:
    started.set()
    time.sleep(0.5)
    return "finished"


def main() -> None:
    server = RPCServer("memory://", registry=registry, queue="stopping-demo")

    def caller() -> None:
        with RPCProxy("memory://", queue="stopping-demo") as proxy:
            print(proxy.slow())  # finished: the reply is sent before the server stops

    thread = threading.Thread(target=caller)
    thread.start()

    def stop_when_busy() -> None:
        started.wait()
        server.stop()  # returns at once; run() returns once the call has finished

    threading.Thread(target=stop_when_busy).start()
    server.run()  # blocks; in the main thread it also stops on SIGINT and SIGTERM
    thread.join()
    print("server stopped")


if __name__ == "__main__":
    main()
