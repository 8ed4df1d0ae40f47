"""A caller in its own process: ``python call.py [BROKER_URL]`` while serve.py runs."""

import sys

from kombu_rpc import RPCProxy

if __name__ == "__main__":
    broker = sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@localhost//"
    with RPCProxy(broker, queue="rpc_queue", timeout=10) as proxy:
        print(proxy.fib(30))  # 832040
