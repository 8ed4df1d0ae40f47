"""Brokers as URLs or kombu Connections, and retry policies."""

from kombu import Connection

from kombu_rpc import ConfigurationError, RPCProxy, RPCServer, remote
from kombu_rpc.connection import DEFAULT_RETRY_POLICY


@remote
def ping() -> str:
    return "pong"


def main() -> None:
    print(DEFAULT_RETRY_POLICY)
    # {'max_retries': 3, 'interval_start': 0.1, 'interval_step': 0.4, 'interval_max': 1.0}

    # A kombu.Connection is cloned, never used directly; its options come along.
    conn = Connection("memory://", transport_options={"polling_interval": 0.5})
    server = RPCServer(conn, retry_policy={"max_retries": 10})
    retries = {"max_retries": 10, "interval_max": 2.0}  # overrides; other keys keep their defaults
    with server.running(), RPCProxy(conn, retry_policy=retries) as proxy:
        print(proxy.ping())  # pong

    try:
        RPCProxy("memory://", retry_policy={"retries": 10})
    except ConfigurationError as exc:
        print(exc)  # unknown retry_policy keys ['retries']; allowed: [...]

    try:
        RPCProxy("nosuchtransport://localhost")
    except ConfigurationError as exc:
        print(exc)  # unknown or unavailable transport in 'nosuchtransport://localhost': ...


if __name__ == "__main__":
    main()
