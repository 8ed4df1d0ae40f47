"""What ``typed()`` and ``check_interface()`` accept, without a server."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import pytest

from kombu_rpc import AsyncRPCProxy, ConfigurationError, MethodProxy, RPCProxy, call_async, call_map
from kombu_rpc.interfaces import interface_methods, mismatches

pytestmark = pytest.mark.timeout(10)


class Math(Protocol):
    def add(self, a: int, b: int = 0, /, *rest: int, scale: float, **options: Any) -> int: ...


class AsyncMath(Protocol):
    async def add(self, a: int, b: int) -> int: ...


class Functions:
    """A plain class of static methods is an interface too."""

    @staticmethod
    def add(a: int, b: int) -> int:
        return a + b


def test_a_typed_view_offers_only_the_declared_methods() -> None:
    with RPCProxy("memory://", queue="q") as proxy:
        math = proxy.typed(Math)
        assert isinstance(math.add, MethodProxy)
        assert repr(math.add) == "<MethodProxy 'add' on 'q'>"
        assert dir(math) == ["add"]
        with pytest.raises(AttributeError, match="Math declares no remote method 'sub'"):
            math.sub  # type: ignore[attr-defined]  # noqa: B018
        assert repr(proxy.typed(Functions, prefix="calc")) == "<typed Functions: add>"
        assert repr(proxy.typed(Functions, prefix="calc").add) == "<MethodProxy 'calc.add' on 'q'>"


@pytest.mark.parametrize(
    ("interface", "message"),
    [
        (len, "typed\\(\\) takes a class"),
        (type("Empty", (), {}), "Empty declares no public method"),
        (type("Data", (), {"limit": 3}), "Data.limit is not a method"),
        (AsyncMath, "AsyncMath.add is declared with async def: an RPCProxy's calls block"),
    ],
)
def test_a_proxy_refuses_what_is_no_interface(interface: Any, message: str) -> None:
    with RPCProxy("memory://") as proxy, pytest.raises(ConfigurationError, match=message):
        proxy.typed(interface)


def test_an_async_proxy_needs_async_methods() -> None:
    proxy = AsyncRPCProxy("memory://")
    try:
        with pytest.raises(ConfigurationError, match=r"Math\.add is declared with def: an AsyncRPCProxy"):
            proxy.typed(Math)
        assert repr(proxy.typed(AsyncMath).add) == "<AsyncMethodProxy 'add' on 'rpc_queue'>"
        with pytest.raises(TypeError, match=r"call_async\(\) takes a method of an RPCProxy"):
            call_async(proxy.typed(AsyncMath).add, 1, 2)  # type: ignore[arg-type]
        # an async proxy's methods have no map (one it made up would be a remote call)
        with pytest.raises(TypeError, match=r"call_map\(\) takes a method of an RPCProxy"):
            call_map(proxy.typed(AsyncMath).add, [1], [2])  # type: ignore[arg-type]
    finally:
        asyncio.run(proxy.aclose())


def test_a_prefix_is_a_dotted_name() -> None:
    with RPCProxy("memory://") as proxy, pytest.raises(ConfigurationError, match=r"invalid prefix 'math\.'"):
        proxy.typed(Math, prefix="math.")


def test_call_async_takes_a_method_of_a_proxy_only() -> None:
    with pytest.raises(TypeError, match="call_async\\(\\) takes a method of an RPCProxy"):
        call_async(len, [])
    for other in (len, ThreadPoolExecutor(1)):  # an executor has a map of its own
        with pytest.raises(TypeError, match="call_map\\(\\) takes a method of an RPCProxy"):
            call_map(other, [[]])  # type: ignore[arg-type]


def test_call_async_returns_the_methods_future() -> None:
    class Fake:
        def call_async(self, *args: Any, **kwargs: Any) -> Future[Any]:
            future: Future[Any] = Future()
            future.set_result((args, kwargs))
            return future

    assert call_async(Fake(), 1, b=2).result(0) == ((1,), {"b": 2})  # type: ignore[arg-type]


def test_parameters_are_compared_by_name_kind_and_default() -> None:
    methods = interface_methods(Math, "", asynchronous=False)
    declared = "add: declared (a, b=..., /, *rest, scale, **options)"

    def served(signature: str) -> list[str]:
        return mismatches(methods, [{"name": "add", "signature": signature}])

    assert served("(a: 'int', b: 'int' = 0, /, *rest, scale: float, **options) -> int") == []
    # a server whose function has no readable signature is not held against it
    assert served("(...)") == []
    assert served("(a, b=0, /, *rest, scale=1.0, **options)") == [
        f"{declared}, served (a, b=..., /, *rest, scale=..., **options)"
    ]
    assert served("(a, b=0, *, scale, **options)") == [f"{declared}, served (a, b=..., *, scale, **options)"]
    assert mismatches(methods, []) == ["add: not served"]
    assert mismatches(methods, "nonsense") == ["the server's description is not a list: 'nonsense'"]


def test_a_generic_interface_may_be_given_with_its_type_arguments() -> None:
    from typing import Generic, TypeVar

    T = TypeVar("T")

    class Repo(Protocol, Generic[T]):
        def get(self, key: str) -> T: ...

    with RPCProxy("memory://", queue="q") as proxy:
        repo = proxy.typed(Repo[int])
        assert repr(repo) == "<typed Repo: get>"
        assert repr(repo.get) == "<MethodProxy 'get' on 'q'>"
