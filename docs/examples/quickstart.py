"""Quickstart: serve ``fib`` on memory:// in a background thread and call it."""

from kombu_rpc import RPCProxy, RPCServer, remote


@remote
def fib(n: int) -> int:
    """The n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def main() -> None:
    server = RPCServer("memory://")  # serves every @remote function
    with server.running():  # returns once the server consumes its queue
        with RPCProxy("memory://") as proxy:
            print(proxy.fib(30))  # 832040


if __name__ == "__main__":
    main()
