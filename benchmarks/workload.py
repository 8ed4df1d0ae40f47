"""The remote functions every implementation serves, so that all do the same work."""

from __future__ import annotations

import threading
from collections.abc import Callable
from time import perf_counter
from typing import Any


def fib(n: int) -> int:
    """The n-th Fibonacci number, computed the slow recursive way.

    ``fib(0)`` is the trivial call of the latency scenarios; ``fib(22)`` (a few
    milliseconds of pure-Python work) is the CPU-bound call of the process scenario.
    """
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def echo(value: Any) -> Any:
    """Return ``value`` unchanged (the payload scenarios)."""
    return value


class Workload:
    """The functions served in one measurement, with a counter for casts.

    ``count()`` is the cast target: it counts its calls and remembers when the last
    one ran, so a cast benchmark can wait until the server has executed all of them.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.count = 0
        #: ``perf_counter()`` when ``count()`` last ran.
        self.last_count_at = 0.0

    def count_call(self) -> None:
        """Count one cast."""
        with self._cond:
            self.count += 1
            self.last_count_at = perf_counter()
            self._cond.notify_all()

    def wait_count(self, target: int, timeout: float) -> bool:
        """Wait until ``count()`` ran ``target`` times; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self.count >= target, timeout)

    def handlers(self) -> dict[str, Callable[..., Any]]:
        """Remote name -> function, as every implementation serves them."""
        return {"fib": fib, "echo": echo, "count": self.count_call}
