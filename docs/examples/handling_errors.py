"""What a caller sees when a call fails."""

from kombu_rpc import (
    InvalidArguments,
    MethodNotFound,
    Registry,
    RemoteError,
    RPCError,
    RPCProxy,
    RPCServer,
    RPCTimeout,
)

registry = Registry()


@registry.remote
def divide(a: float, b: float) -> float:
    return a / b


def main() -> None:
    server = RPCServer("memory://", registry=registry, queue="errors-demo")
    with server.running(), RPCProxy("memory://", queue="errors-demo", timeout=5) as proxy:
        # The remote function raised: RemoteError carries the remote class name,
        # message and (unless the server has send_tracebacks=False) traceback.
        try:
            proxy.divide(1, 0)
        except RemoteError as exc:
            print(type(exc).__name__, exc.exc_type, exc.exc_message)
            # RemoteError ZeroDivisionError division by zero
            print(exc.remote_traceback.splitlines()[0])  # Traceback (most recent call last):

        # No function of that name: refused before anything runs.
        try:
            proxy.multiply(2, 3)
        except MethodNotFound as exc:
            print(exc)  # MethodNotFound: no remote function named 'multiply'

        # Arguments that do not fit the signature: refused, the function is not run.
        try:
            proxy.divide(1, 2, 3)
        except InvalidArguments as exc:
            print(exc)  # TypeError: divide(): too many positional arguments

        # Every error of the library is an RPCError, so one handler can catch them all.
        try:
            proxy.divide("one", 2)
        except RPCError as exc:
            print(exc)  # TypeError: unsupported operand type(s) for /: 'str' and 'int'

    # No reply before the deadline (here: nothing serves the queue) raises RPCTimeout.
    with RPCProxy("memory://", queue="nobody-serves-this", timeout=0.5) as proxy:
        try:
            proxy.divide(1, 2)
        except RPCTimeout as exc:
            print(exc)  # no reply to 'divide' within 0.5s


if __name__ == "__main__":
    main()
