"""Registering functions: names, duplicates, decorator forms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kombu_rpc import ConfigurationError, Registry, default_registry, remote
from kombu_rpc.registry import Procedure


def test_remote_registers_and_returns_the_function_unchanged() -> None:
    reg = Registry()

    def fib(n: int) -> int:
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    assert reg.remote(fib) is fib
    assert fib(10) == 55
    assert "fib" in reg and reg.names() == ["fib"] and len(reg) == 1
    procedure = reg.get("fib")
    assert procedure is not None and procedure.func is fib and procedure.name == "fib"


def test_an_explicit_dotted_name() -> None:
    reg = Registry()

    @reg.remote(name="math.add")
    def add(a: int, b: int) -> int:
        return a + b

    assert reg.names() == ["math.add"] and add(1, 2) == 3


@pytest.mark.parametrize(
    "name", ["", "_private", "a._b", "a..b", ".a", "a.", "1a", "a b", "a-b", "ü", 3, None]
)
def test_invalid_names_are_refused_at_registration(name: object) -> None:
    with pytest.raises(ConfigurationError, match="invalid remote name"):
        Registry().register(lambda: None, name=name)  # type: ignore[arg-type]


def test_a_duplicate_name_is_refused() -> None:
    reg = Registry()
    reg.register(lambda: 1, name="one")
    with pytest.raises(ConfigurationError, match="already registered"):
        reg.register(lambda: 2, name="one")
    assert reg.get("one") is not None and reg.get("one").func() == 1  # type: ignore[union-attr]


def test_the_same_function_defined_again_replaces_its_registration() -> None:
    """A module reloaded, or a notebook cell run twice, defines the function anew."""
    reg = Registry()
    source = "def lookup(key):\n    return {'version': VERSION}\n"
    first: dict[str, Any] = {"__name__": "notebook", "VERSION": 1}
    exec(source, first)
    reg.remote(first["lookup"])
    again: dict[str, Any] = {"__name__": "notebook", "VERSION": 2}
    exec(source, again)
    reg.remote(again["lookup"])  # same module and qualified name: replaced
    assert reg.get("lookup").func("k") == {"version": 2}  # type: ignore[union-attr]
    reg.remote(again["lookup"])  # and registering the very same function is a no-op
    # a different function under the taken name is still refused
    elsewhere: dict[str, Any] = {"__name__": "other_module", "VERSION": 3}
    exec(source, elsewhere)
    with pytest.raises(ConfigurationError, match="already registered"):
        reg.remote(elsewhere["lookup"])
    assert reg.get("lookup").func("k") == {"version": 2}  # type: ignore[union-attr]


def test_expected_exceptions_are_recorded_and_checked() -> None:
    reg = Registry()

    @reg.remote(expected=(KeyError, LookupError))
    def find(key: str) -> str:
        raise KeyError(key)

    @reg.remote(expected=ValueError)
    def parse(text: str) -> int:
        return int(text)

    assert reg.get("find").expected == (KeyError, LookupError)  # type: ignore[union-attr]
    assert reg.get("parse").expected == (ValueError,)  # type: ignore[union-attr]
    with pytest.raises(ConfigurationError, match="exception classes"):
        reg.register(lambda: None, name="bad", expected=("KeyError",))  # type: ignore[arg-type]


def test_non_callables_and_reserved_names_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="callable"):
        Registry().register(42, name="x")  # type: ignore[type-var]
    with pytest.raises(ConfigurationError, match="reserved"):
        Registry().register(lambda: None, name="kombu_rpc.ping")


def test_coroutine_functions_are_registered_and_described() -> None:
    async def fetch(key: str, default: int = 0) -> int:
        """Fetch a value.

        More text.
        """
        return default

    reg = Registry()
    reg.register(fetch)
    procedure = reg.get("fetch")
    assert procedure is not None and procedure.is_coroutine
    assert procedure.describe() == {
        "name": "fetch",
        "signature": "(key: str, default: int = 0) -> int",
        "doc": "Fetch a value.",
    }


def test_lambdas_need_a_name() -> None:
    with pytest.raises(ConfigurationError, match="pass name="):
        Registry().register(lambda: None)


def test_signature_checks_use_the_captured_signature() -> None:
    reg = Registry()
    reg.register(lambda a, b=1: a, name="f")
    procedure = reg.get("f")
    assert procedure is not None
    procedure.check_arguments([1], {})
    procedure.check_arguments([], {"a": 1, "b": 2})
    for args, kwargs in [([], {}), ([1, 2, 3], {}), ([1], {"c": 1})]:
        with pytest.raises(TypeError):
            procedure.check_arguments(args, kwargs)


@pytest.mark.parametrize(
    ("func", "fits", "does_not_fit"),
    [
        (lambda a, /, b, c=0: a, [[1, 2], [1, 2, 3]], [[1], [1, 2, 3, 4]]),
        (lambda a, *, k: a, [], [[1], [1, 2]]),  # keyword-only: a positional call never fits
        (lambda *args: args, [[], [1, 2, 3]], []),
        (lambda a, **kw: a, [[1]], [[], [1, 2]]),
    ],
)
def test_positional_calls_are_checked_like_signature_bind(
    func: Callable[..., Any], fits: list[list[Any]], does_not_fit: list[list[Any]]
) -> None:
    procedure = Procedure.of("f", func)
    for args in fits:
        procedure.check_arguments(args, {})
    for args in does_not_fit:
        with pytest.raises(TypeError):
            procedure.check_arguments(args, {})


def test_module_level_remote_uses_the_default_registry() -> None:
    @remote(name="tests.unit.registry_probe")
    def probe() -> str:
        return "ok"

    try:
        assert "tests.unit.registry_probe" in default_registry
        assert probe() == "ok"
    finally:
        default_registry.unregister("tests.unit.registry_probe")
    assert "tests.unit.registry_probe" not in default_registry
