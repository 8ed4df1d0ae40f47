"""Registries and remote names."""

import operator

from kombu_rpc import ConfigurationError, Registry, RPCProxy, RPCServer

registry = Registry()


@registry.remote  # served as "greet"
def greet(name: str) -> str:
    return f"hello {name}"


@registry.remote(name="math.add")  # served as "math.add"
def add(a: int, b: int) -> int:
    return a + b


# The non-decorator form. A lambda needs an explicit name: its __name__ is "<lambda>".
registry.register(operator.mul, name="math.mul")
registry.register(lambda s: s[::-1], name="text.reverse")

try:
    registry.register(add, name="math.add")
except ConfigurationError as exc:
    print("refused:", exc)  # a function is already registered as 'math.add': ...

try:
    registry.register(lambda: None)
except ConfigurationError as exc:
    print("refused:", exc)  # invalid remote name '<lambda>': ...


def main() -> None:
    print(registry.names())  # ['greet', 'math.add', 'math.mul', 'text.reverse']
    print(add(1, 2))  # registered functions stay callable locally: 3
    server = RPCServer("memory://", registry=registry, queue="naming-demo")
    with server.running(), RPCProxy("memory://", queue="naming-demo") as proxy:
        print(proxy.greet("world"))  # hello world
        print(proxy.math.add(2, 3))  # 5
        print(proxy["math.mul"](6, 7))  # 42
        print(proxy.text.reverse("abc"))  # cba


if __name__ == "__main__":
    main()
