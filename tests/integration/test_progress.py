"""Progress reports and keepalives of long calls, run on memory:// and on every real
broker: ``current_call().progress()`` reaching the caller's ``on_progress``, and the
``idle_timeout`` of plain calls (a slow server kept alive, a dead one noticed)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kombu_rpc import AsyncRPCProxy, IdleTimeout, Registry, RPCProxy, RPCServer, current_call

from .test_streaming import ServerProcess, killable_url, server_processes

__all__ = ["killable_url", "server_processes"]  # fixtures shared with test_streaming

pytestmark = pytest.mark.timeout(60)

Serve = Callable[..., RPCServer]
MakeProxy = Callable[..., RPCProxy]


@pytest.fixture
def jobs() -> Registry:
    reg = Registry()

    @reg.remote
    def job(steps: int, pause: float = 0.0) -> str:
        call = current_call()
        assert call is not None
        for step in range(steps):
            call.progress({"step": step, "of": steps})
            if pause:
                time.sleep(pause)
        return "done"

    @reg.remote
    def counted(n: int) -> Iterator[int]:
        call = current_call()
        assert call is not None
        for i in range(n):
            call.progress(i / n)
            yield i

    @reg.remote
    def quiet(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    @reg.remote
    def bad_progress() -> None:
        call = current_call()
        assert call is not None
        call.progress({1, 2})  # a set: not JSON

    return reg


class Seen:
    """Progress values, in the order they arrived."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.first = threading.Event()

    def __call__(self, value: Any) -> None:
        self.values.append(value)
        self.first.set()


@pytest.mark.parametrize("concurrency", [1, 4])
def test_progress_reaches_the_callback_in_order_before_the_result(
    serve: Serve, proxy: RPCProxy, jobs: Registry, concurrency: int
) -> None:
    serve(registry=jobs, concurrency=concurrency)
    seen = Seen()
    assert proxy.options(on_progress=seen).job(5) == "done"
    assert seen.values == [{"step": i, "of": 5} for i in range(5)]
    assert proxy.job(3) == "done"  # no callback: no progress asked for, none sent


def test_progress_of_a_stream(serve: Serve, proxy: RPCProxy, jobs: Registry) -> None:
    serve(registry=jobs)
    seen = Seen()
    assert list(proxy.options(on_progress=seen).counted.stream(4)) == [0, 1, 2, 3]
    assert seen.values == [0.0, 0.25, 0.5, 0.75]


def test_progress_of_calls_not_waited_on(serve: Serve, proxy: RPCProxy, jobs: Registry) -> None:
    serve(registry=jobs)
    seen = Seen()
    future = proxy.options(on_progress=seen).job.call_async(3)
    assert future.result(10) == "done"
    assert [value["step"] for value in seen.values] == [0, 1, 2]


def test_async_progress_and_idle_timeout(
    serve: Serve, broker_url: str, queue_name: str, jobs: Registry
) -> None:
    serve(registry=jobs)
    seen = Seen()

    async def main() -> None:
        async with AsyncRPCProxy(broker_url, queue=queue_name, timeout=10) as proxy:
            assert await proxy.options(on_progress=seen).job(2) == "done"
            assert await proxy.options(idle_timeout=0.3).quiet(1.0) == 1.0

    asyncio.run(main(), debug=True)
    assert [value["step"] for value in seen.values] == [0, 1]


def test_a_progress_value_that_cannot_be_encoded_fails_the_call(
    serve: Serve, proxy: RPCProxy, jobs: Registry
) -> None:
    from kombu_rpc import RemoteError

    serve(registry=jobs)
    with pytest.raises(RemoteError, match="SerializationError"):
        proxy.options(on_progress=Seen()).bad_progress()


@pytest.mark.parametrize("concurrency", [1, 4])
def test_keepalives_keep_a_slow_call_from_looking_dead(
    serve: Serve, proxies: MakeProxy, jobs: Registry, concurrency: int
) -> None:
    serve(registry=jobs, concurrency=concurrency)
    proxy = proxies(idle_timeout=0.3)
    assert proxy.quiet(1.2) == 1.2  # four idle timeouts long, yet alive


def test_progress_and_keepalives_of_a_map(serve: Serve, proxies: MakeProxy, jobs: Registry) -> None:
    serve(registry=jobs, concurrency=2)
    seen = Seen()
    proxy = proxies(idle_timeout=0.3)
    assert list(proxy.options(on_progress=seen).job.map([2, 3])) == ["done", "done"]
    assert sorted((value["of"], value["step"]) for value in seen.values) == [
        (2, 0),
        (2, 1),
        (3, 0),
        (3, 1),
        (3, 2),
    ]
    # While its caller is away between two results, the link's thread reads for the
    # calls of a map that hear from their servers: the slow one stays alive
    results = proxy.quiet.map([0.05, 1.2])
    assert next(results) == 0.05
    time.sleep(1.0)  # the caller busy elsewhere, for three idle timeouts
    assert next(results) == 1.2


def test_idle_timeout_options_are_checked(proxy: RPCProxy) -> None:
    from kombu_rpc import ConfigurationError

    with pytest.raises(ConfigurationError, match="idle_timeout"):
        proxy.options(idle_timeout=0)
    with pytest.raises(ConfigurationError, match="on_progress"):
        proxy.options(on_progress="print")  # type: ignore[arg-type]


def test_a_dead_server_is_noticed_within_the_idle_timeout_of_a_plain_call(
    killable_url: str, queue_name: str, server_processes: Callable[[str, str], ServerProcess]
) -> None:
    server = server_processes(killable_url, queue_name)
    with RPCProxy(killable_url, queue=queue_name, timeout=30) as proxy:
        seen = Seen()
        future = proxy.options(idle_timeout=1.0, on_progress=seen).work.call_async(400, 0.05)
        assert seen.first.wait(10)  # it runs
        server.signal(signal.SIGKILL)
        error = future.exception(timeout=1.0 + 2.0)
        assert isinstance(error, IdleTimeout)
