"""Registering plain functions as remote procedures."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from .errors import ConfigurationError
from .events import Event, Subscription
from .protocol import NAME_PATTERN as NAME_PATTERN  # re-exported: it used to live here

F = TypeVar("F", bound=Callable[..., Any])
H = TypeVar("H", bound=Callable[[Event], Any])
#: The ``expected`` argument of :func:`remote`: an exception class or a tuple of them.
Expected = type[BaseException] | tuple[type[BaseException], ...]

#: Names under this prefix are served by every server itself (``kombu_rpc.ping``,
#: ``kombu_rpc.describe``) and cannot be registered.
RESERVED_PREFIX = "kombu_rpc."


@dataclass(frozen=True)
class Procedure:
    """A registered function with the signature captured at registration time."""

    name: str
    func: Callable[..., Any]
    signature: inspect.Signature | None
    #: Exceptions the function raises as part of its contract: the server logs them
    #: at INFO, without a traceback, instead of at ERROR (they still reach the caller).
    expected: tuple[type[BaseException], ...] = ()
    #: True for ``async def`` functions, which the server runs on an event loop.
    is_coroutine: bool = field(init=False)
    #: True for generator functions, plain or ``async def``: their items can be
    #: streamed (a plain call returns them as a list).
    streams: bool = field(init=False)
    #: How many positional arguments fit when there are no keyword arguments, if the
    #: signature has only positional parameters (a check without ``Signature.bind``).
    _positional: range | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_coroutine", inspect.iscoroutinefunction(self.func))
        object.__setattr__(
            self, "streams", inspect.isgeneratorfunction(self.func) or inspect.isasyncgenfunction(self.func)
        )
        object.__setattr__(self, "_positional", _positional_counts(self.signature))

    @classmethod
    def of(
        cls, name: str, func: Callable[..., Any], expected: tuple[type[BaseException], ...] = ()
    ) -> Procedure:
        """Wrap ``func``, capturing its signature when it has one."""
        signature: inspect.Signature | None = None
        try:
            signature = inspect.signature(func, eval_str=True)
        except (TypeError, ValueError):  # some builtins have no introspectable signature
            pass
        except Exception:  # string annotations that do not evaluate yet: keep them as text
            signature = inspect.signature(func)
        return cls(name, func, signature, expected)

    def describe(self) -> dict[str, str]:
        """Name, signature and first docstring line, as ``kombu_rpc.describe`` reports."""
        doc = inspect.getdoc(self.func) or ""
        return {
            "name": self.name,
            "signature": "(...)" if self.signature is None else str(self.signature),
            "doc": doc.strip().splitlines()[0] if doc.strip() else "",
        }

    def check_arguments(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Raise ``TypeError`` if ``args``/``kwargs`` do not fit the signature."""
        if not kwargs and self._positional is not None and len(args) in self._positional:
            return
        if self.signature is not None:
            self.signature.bind(*args, **kwargs)


def _positional_counts(signature: inspect.Signature | None) -> range | None:
    """The numbers of positional arguments ``signature`` accepts, if all its
    parameters are positional (no ``*args``, ``**kwargs`` or keyword-only ones)."""
    if signature is None:
        return None
    params = list(signature.parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind not in positional for p in params):
        return None
    required = sum(1 for p in params if p.default is inspect.Parameter.empty)
    return range(required, len(params) + 1)


class Registry:
    """A set of functions served under unique names.

    Example:
        >>> reg = Registry()
        >>> @reg.remote(name="math.add")
        ... def add(a, b):
        ...     return a + b
        >>> "math.add" in reg
        True
    """

    def __init__(self) -> None:
        self._procedures: dict[str, Procedure] = {}
        # (exchange, group, name): the subscription's queue
        self._subscriptions: dict[tuple[str, str | None, str], Subscription] = {}

    @overload
    def remote(self, func: F, /) -> F: ...

    @overload
    def remote(
        self, func: None = None, /, *, name: str | None = None, expected: Expected = ()
    ) -> Callable[[F], F]: ...

    def remote(
        self, func: Callable[..., Any] | None = None, /, *, name: str | None = None, expected: Expected = ()
    ) -> Any:
        """Register ``func`` under ``name`` (default: its ``__name__``).

        Usable bare (``@reg.remote``) or with arguments (``@reg.remote(name="a.b")``).
        Returns the function unchanged, so it stays callable locally. Registering the
        same function again (same module and qualified name: a module reloaded, a
        notebook cell run twice) replaces the earlier registration.

        Args:
            func: The function.
            name: The remote name: dotted identifiers, such as ``"math.add"``.
            expected: Exception classes the function raises as part of its contract
                (``KeyError`` for a missing record, say). The server logs a failure
                with its traceback at ERROR, but one of these at INFO without it, as
                nameko's ``expected_exceptions`` does. Callers get them all the same.

        Raises:
            ConfigurationError: The name is invalid or taken by another function, the
                object is not a plain callable, or ``expected`` holds something other
                than exception classes.
        """
        if func is None:
            return lambda f: self.register(f, name=name, expected=expected)
        return self.register(func, name=name, expected=expected)

    def register(self, func: F, name: str | None = None, expected: Expected = ()) -> F:
        """Register ``func``; the non-decorator form of :meth:`remote`."""
        if not callable(func):
            raise ConfigurationError(f"@remote needs a callable, got {func!r}")
        if isinstance(expected, type):
            expected = (expected,)
        if not all(isinstance(cls, type) and issubclass(cls, BaseException) for cls in expected):
            raise ConfigurationError(f"expected must be exception classes, got {expected!r}")
        if name is None:
            name = getattr(func, "__name__", None)
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise ConfigurationError(
                f"invalid remote name {name!r}: use dotted identifiers like 'math.add' "
                "whose parts do not start with '_' (pass name=... to @remote)"
            )
        if name.startswith(RESERVED_PREFIX):
            raise ConfigurationError(f"invalid remote name {name!r}: {RESERVED_PREFIX!r} is reserved")
        taken = self._procedures.get(name)
        identity = _identity(func)
        if (
            taken is not None
            and taken.func is not func
            and (identity is None or identity != _identity(taken.func))
        ):
            raise ConfigurationError(
                f"a function is already registered as {name!r}: {taken.func!r}; choose another name=..."
            )
        self._procedures[name] = Procedure.of(name, func, tuple(expected))
        return func

    def subscribe(
        self,
        exchange: str,
        binding_key: str | Sequence[str] = "#",
        *,
        type: str = "topic",
        group: str | None = None,
        name: str | None = None,
    ) -> Callable[[H], H]:
        """Subscribe the decorated function to the events of ``exchange`` (see
        :mod:`kombu_rpc.events`); it is called with each :class:`~kombu_rpc.events.Event`
        by the servers of this registry, and stays callable locally.

        Example:
            >>> reg = Registry()
            >>> @reg.subscribe("logs", "kern.*")
            ... def on_kernel_log(event):
            ...     print(event.routing_key, event.payload)
            >>> [s.binding_keys for s in reg.subscriptions()]
            [('kern.*',)]

        Args:
            exchange: The exchange's name (declared by the server if missing).
            binding_key: Which routing keys reach the function, one key or a sequence
                of them (an event matching several is handled once): on a topic
                exchange with wildcards (``*`` one word, ``#`` any number of them); on
                a direct exchange, the key itself; ignored on a fanout exchange.
            type: ``"fanout"``, ``"direct"`` or ``"topic"``.
            group: ``None``: every server handles each event; a name: the servers
                subscribed with that group share a queue, and each event is handled
                by one of them.
            name: Names the subscription's queue (default: the function's module
                and qualified name); one function per name, exchange and group.

        Raises:
            ConfigurationError: An argument is invalid, or another function is
                subscribed under the same name, exchange and group.
        """

        def decorate(func: H) -> H:
            subscription = Subscription.of(func, exchange, binding_key, type, group, name)
            key = (subscription.exchange, subscription.group, subscription.name)
            taken = self._subscriptions.get(key)
            if (
                taken is not None
                and taken.func is not func
                and (_identity(func) is None or _identity(func) != _identity(taken.func))
            ):
                raise ConfigurationError(
                    f"a function is already subscribed to {exchange!r} as {subscription.name!r}: "
                    f"{taken.func!r}; choose another name=..."
                )
            self._subscriptions[key] = subscription
            return func

        return decorate

    def subscriptions(self) -> list[Subscription]:
        """Return the subscriptions, in the order they were made."""
        return list(self._subscriptions.values())

    def unregister(self, name: str) -> None:
        """Remove ``name``; raises ``KeyError`` if it is not registered."""
        del self._procedures[name]

    def get(self, name: str) -> Procedure | None:
        """Return the procedure registered as ``name``, or ``None``."""
        return self._procedures.get(name)

    def names(self) -> list[str]:
        """Return the registered names, sorted."""
        return sorted(self._procedures)

    def __contains__(self, name: object) -> bool:
        return name in self._procedures

    def __iter__(self) -> Iterator[Procedure]:
        return iter(list(self._procedures.values()))

    def __len__(self) -> int:
        return len(self._procedures)

    def __repr__(self) -> str:
        return f"<Registry {self.names()}>"


#: The registry used by the module-level :func:`remote` and by servers given no registry.
default_registry = Registry()


@overload
def remote(func: F, /) -> F: ...


@overload
def remote(func: None = None, /, *, name: str | None = None, expected: Expected = ()) -> Callable[[F], F]: ...


def remote(
    func: Callable[..., Any] | None = None, /, *, name: str | None = None, expected: Expected = ()
) -> Any:
    """Register a function in :data:`default_registry`; see :meth:`Registry.remote`.

    Example:
        >>> @remote
        ... def fib(n: int) -> int:
        ...     return n if n < 2 else fib(n - 1) + fib(n - 2)
        >>> fib(10)   # still an ordinary function
        55
    """
    if func is None:
        return default_registry.remote(name=name, expected=expected)
    return default_registry.register(func, name=name, expected=expected)


def subscribe(
    exchange: str,
    binding_key: str | Sequence[str] = "#",
    *,
    type: str = "topic",
    group: str | None = None,
    name: str | None = None,
) -> Callable[[H], H]:
    """Subscribe a function in :data:`default_registry`; see :meth:`Registry.subscribe`."""
    return default_registry.subscribe(exchange, binding_key, type=type, group=group, name=name)


def _identity(func: Callable[..., Any]) -> tuple[Any, Any] | None:
    """Where a function was defined (module, qualified name): the same for a function
    defined again by a reloaded module or a notebook cell run twice."""
    module, qualname = getattr(func, "__module__", None), getattr(func, "__qualname__", None)
    return None if module is None or qualname is None or "<lambda>" in qualname else (module, qualname)
