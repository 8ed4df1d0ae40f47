"""Typed proxies: remote calls that mypy and editors check against an interface.

An interface is a class whose public methods declare the remote functions, most often
a :class:`typing.Protocol`::

    class Math(Protocol):
        def add(self, a: int, b: int) -> int: ...

    math = proxy.typed(Math)
    math.add(1, 2)             # int, checked by mypy
    call_async(math.add, 1, 2)  # concurrent.futures.Future[int]
    call_map(math.add, [1, 2], [3, 4])  # Iterator[int]

For :class:`~kombu_rpc.AsyncRPCProxy` the methods are declared ``async def``, so that
each call is an awaitable of the declared result. Nothing of the interface is sent: the
server serves its own functions, and :meth:`~kombu_rpc.proxy.RPCProxy.check_interface` asks
it (through ``kombu_rpc.describe``) whether they match.
"""

from __future__ import annotations

import ast
import inspect
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, overload

from .errors import ConfigurationError
from .protocol import NAME_PATTERN

__all__ = ["call_async", "call_map"]

_P = ParamSpec("_P")
_R = TypeVar("_R")
_A1 = TypeVar("_A1")
_A2 = TypeVar("_A2")
_A3 = TypeVar("_A3")

#: One parameter as compared with a server's: name, kind, whether it has a default.
_Parameter = tuple[str, inspect._ParameterKind, bool]


@dataclass(frozen=True)
class Method:
    """One method of an interface: the remote function's name, and its signature
    without ``self``."""

    remote: str
    signature: inspect.Signature


def interface_methods(interface: object, prefix: str, asynchronous: bool) -> dict[str, Method]:
    """Each public method of ``interface``, by attribute name.

    Raises:
        ConfigurationError: ``interface`` is not a class, declares no public method,
            has a public attribute that is not a method, or declares its methods
            ``async def`` where plain ``def`` is needed (or the other way around).
    """
    interface = typing.get_origin(interface) or interface  # Repo[int]: the class Repo
    if not isinstance(interface, type):
        raise ConfigurationError(
            f"typed() takes a class declaring the remote functions (a typing.Protocol), got {interface!r}"
        )
    if prefix and not NAME_PATTERN.fullmatch(prefix):
        raise ConfigurationError(f"invalid prefix {prefix!r}: a dotted remote name such as 'math'")
    methods: dict[str, Method] = {}
    for name in dir(interface):
        if name.startswith("_"):
            continue
        attribute = inspect.getattr_static(interface, name)
        bound = isinstance(attribute, classmethod) or inspect.isfunction(attribute)
        function = attribute.__func__ if isinstance(attribute, (staticmethod, classmethod)) else attribute
        if not inspect.isfunction(function):
            raise ConfigurationError(
                f"{interface.__name__}.{name} is not a method: an interface declares remote functions only"
            )
        if inspect.iscoroutinefunction(function) != asynchronous:
            raise ConfigurationError(
                f"{interface.__name__}.{name} is declared with "
                + (
                    "def: an AsyncRPCProxy's interface declares its methods 'async def'"
                    if asynchronous
                    else "async def: an RPCProxy's calls block; declare it with def, "
                    "or use AsyncRPCProxy.typed()"
                )
            )
        signature = inspect.signature(function)
        if bound:  # drop self (or cls)
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        methods[name] = Method(f"{prefix}.{name}" if prefix else name, signature)
    if not methods:
        raise ConfigurationError(f"{interface.__name__} declares no public method")
    return methods


class TypedProxy:
    """What ``typed()`` returns at run time: the interface's methods, each reached as
    the proxy's method of that remote name; any other attribute raises
    :class:`AttributeError`, as the interface would."""

    __slots__ = ("_interface", "_methods")

    def __init__(self, interface: type, methods: Mapping[str, Any]) -> None:
        self._interface = interface
        self._methods = dict(methods)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._methods[name]
        except KeyError:
            raise AttributeError(f"{self._interface.__name__} declares no remote method {name!r}") from None

    def __dir__(self) -> list[str]:
        return sorted(self._methods)

    def __repr__(self) -> str:
        return f"<typed {self._interface.__name__}: {', '.join(sorted(self._methods))}>"


def typed_view(interface: object, prefix: str, asynchronous: bool, method: Callable[[str], Any]) -> Any:
    """A :class:`TypedProxy` of ``interface`` whose methods are ``method(remote name)``.

    Raises:
        ConfigurationError: As :func:`interface_methods`.
    """
    methods = interface_methods(interface, prefix, asynchronous)
    cls = typing.get_origin(interface) or interface
    assert isinstance(cls, type)  # interface_methods checked it
    return TypedProxy(cls, {name: method(m.remote) for name, m in methods.items()})


def mismatches(methods: Mapping[str, Method], described: object) -> list[str]:
    """How the servers' functions (``kombu_rpc.describe``'s answer) differ from the
    interface's ``methods``: missing functions and different parameters."""
    if not isinstance(described, list):
        return [f"the server's description is not a list: {described!r}"]
    served = {
        entry["name"]: entry.get("signature", "(...)")
        for entry in described
        if isinstance(entry, dict) and isinstance(entry.get("name"), str)
    }
    found: list[str] = []
    for method in methods.values():
        name = method.remote
        if name not in served:
            found.append(f"{name}: not served")
            continue
        theirs = _parameters_of_text(str(served[name]))
        if theirs is None:  # a callable without a readable signature: anything goes
            continue
        ours = [(p.name, p.kind, p.default is not p.empty) for p in method.signature.parameters.values()]
        if ours != theirs:
            found.append(f"{name}: declared {_show(ours)}, served {_show(theirs)}")
    return found


def _parameters_of_text(signature: str) -> list[_Parameter] | None:
    """The parameters of a signature as ``str(inspect.Signature)`` writes it, read with
    :mod:`ast` (nothing in it is evaluated); ``None`` if it cannot be read."""
    try:
        tree = ast.parse(f"def f{signature}: pass")
    except SyntaxError:
        return None
    function = tree.body[0]
    assert isinstance(function, ast.FunctionDef)
    a = function.args
    kind = inspect.Parameter
    positional = [*a.posonlyargs, *a.args]
    first_default, only = len(positional) - len(a.defaults), len(a.posonlyargs)
    found: list[_Parameter] = [
        (arg.arg, kind.POSITIONAL_ONLY if i < only else kind.POSITIONAL_OR_KEYWORD, i >= first_default)
        for i, arg in enumerate(positional)
    ]
    if a.vararg is not None:
        found.append((a.vararg.arg, kind.VAR_POSITIONAL, False))
    defaults = zip(a.kwonlyargs, a.kw_defaults, strict=True)
    found += [(arg.arg, kind.KEYWORD_ONLY, default is not None) for arg, default in defaults]
    if a.kwarg is not None:
        found.append((a.kwarg.arg, kind.VAR_KEYWORD, False))
    return found


def _show(parameters: list[_Parameter]) -> str:
    """``(a, /, b=..., *, c)``: names, kinds and defaults, as a signature writes them."""
    kind = inspect.Parameter
    shown: list[str] = []
    for n, (name, k, default) in enumerate(parameters):
        before = parameters[n - 1][1] if n else None
        if before is kind.POSITIONAL_ONLY and k is not kind.POSITIONAL_ONLY:
            shown.append("/")
        if k is kind.KEYWORD_ONLY and before not in (kind.KEYWORD_ONLY, kind.VAR_POSITIONAL):
            shown.append("*")
        star = "*" if k is kind.VAR_POSITIONAL else "**" if k is kind.VAR_KEYWORD else ""
        shown.append(f"{star}{name}{'=...' if default else ''}")
    if parameters and parameters[-1][1] is kind.POSITIONAL_ONLY:
        shown.append("/")
    return f"({', '.join(shown)})"


def call_async(method: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_R]:
    """Start a call of a typed proxy's method and return the future of its result,
    typed as the interface declares it: ``call_async(math.add, 1, 2)`` is a
    ``Future[int]`` (``math.add.call_async(1, 2)`` works too, untyped).

    Raises:
        TypeError: ``method`` is not a method of an :class:`~kombu_rpc.RPCProxy`.
    """
    start = getattr(method, "call_async", None)
    if start is None or inspect.iscoroutinefunction(start):
        raise TypeError(f"call_async() takes a method of an RPCProxy or of its typed() view, got {method!r}")
    future: Future[_R] = start(*args, **kwargs)
    return future


@overload
def call_map(
    method: Callable[[_A1], _R], iterable: Iterable[_A1], /, *, window: int = ...
) -> Iterator[_R]: ...
@overload
def call_map(
    method: Callable[[_A1, _A2], _R],
    iterable1: Iterable[_A1],
    iterable2: Iterable[_A2],
    /,
    *,
    window: int = ...,
) -> Iterator[_R]: ...
@overload
def call_map(
    method: Callable[[_A1, _A2, _A3], _R],
    iterable1: Iterable[_A1],
    iterable2: Iterable[_A2],
    iterable3: Iterable[_A3],
    /,
    *,
    window: int = ...,
) -> Iterator[_R]: ...
def call_map(method: Callable[..., _R], /, *iterables: Iterable[Any], window: int = 16) -> Iterator[_R]:
    """Call a typed proxy's method once per set of arguments, up to ``window`` calls in
    flight, and iterate over the results, typed as the interface declares them:
    ``call_map(math.add, [1, 2], [3, 4])`` is an ``Iterator[int]`` (see
    :meth:`MethodProxy.map <kombu_rpc.proxy.MethodProxy.map>`, which
    ``math.add.map(...)`` calls untyped).

    Raises:
        TypeError: ``method`` is not a method of an :class:`~kombu_rpc.RPCProxy`.
        ConfigurationError: No iterable, or ``window`` is not a positive integer.
    """
    # looked up on the class (a proxy makes up any name it is asked for): a method of
    # an RPCProxy has both, an AsyncRPCProxy's no map, an executor no call_async
    kind = type(method)
    if not (hasattr(kind, "map") and hasattr(kind, "call_async")):
        raise TypeError(f"call_map() takes a method of an RPCProxy or of its typed() view, got {method!r}")
    results: Iterator[_R] = method.map(*iterables, window=window)  # type: ignore[attr-defined]
    return results
