"""Serializers: JSON by default, pickle only where the server opts in."""

import datetime

from kombu_rpc import MalformedRequest, Registry, RPCProxy, RPCServer

registry = Registry()


@registry.remote
def next_day(day: datetime.date) -> datetime.date:
    return day + datetime.timedelta(days=1)


@registry.remote
def pair(a: int, b: int) -> tuple[int, int]:
    return (a, b)


def main() -> None:
    json_only = RPCServer("memory://", registry=registry, queue="json-only")
    with_pickle = RPCServer("memory://", registry=registry, queue="pickle-ok", accept=["json", "pickle"])
    with json_only.running(), with_pickle.running():
        # JSON (the default): tuples come back as lists.
        with RPCProxy("memory://", queue="json-only") as proxy:
            print(proxy.pair(1, 2))  # [1, 2]

        # pickle to a server that accepts it: replies come back in pickle too.
        with RPCProxy("memory://", queue="pickle-ok", serializer="pickle") as proxy:
            print(proxy.pair(1, 2))  # (1, 2)
            print(proxy.next_day(datetime.date(2024, 2, 28)))  # 2024-02-29

        # pickle to a server that does not accept it: refused, never decoded
        # (the server also logs a warning about the rejected request).
        with RPCProxy("memory://", queue="json-only", serializer="pickle") as proxy:
            try:
                proxy.pair(1, 2)
            except MalformedRequest as exc:
                print(exc.exc_type)  # ContentDisallowed


if __name__ == "__main__":
    main()
