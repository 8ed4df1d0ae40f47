"""What every proxy's link does, on every broker."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import pytest

from kombu_rpc import RPCProxy, RPCServer

pytestmark = pytest.mark.timeout(60)


def test_the_links_thread_survives_an_unexpected_error(
    serve: Callable[..., RPCServer],
    proxies: Callable[..., RPCProxy],
    log_waiter: Callable[[str], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    serve()
    proxy = proxies(timeout=30)
    assert proxy.echo("warm") == "warm"  # connected, link thread running
    link = proxy._client._link
    work = type(link).work
    failures: list[int] = []

    def fail_once(self: Any, timeout: float) -> None:
        if self is link and timeout and not failures:
            failures.append(1)
            raise RuntimeError("a bug in the link")
        work(self, timeout)

    monkeypatch.setattr(type(link), "work", fail_once)
    failed = log_waiter("the link's thread failed")
    # nobody waits on the call: only the link's thread can read its reply, after its
    # failure (a dead thread would leave the future pending until its 30 s timeout)
    future = proxy.echo.call_async("unattended")
    assert future.result(20) == "unattended"
    assert failures and failed.seen.is_set()


def test_waiting_and_unattended_calls_from_many_threads(
    serve: Callable[..., RPCServer], proxy: RPCProxy
) -> None:
    serve(concurrency=4)

    def sync_caller(thread: int) -> list[object]:
        return [proxy.echo([thread, i]) for i in range(100)]

    def async_caller(thread: int) -> list[object]:
        futures = [proxy.echo.call_async([thread, i]) for i in range(100)]
        assert not wait(futures, timeout=30).not_done
        return [f.result() for f in futures]

    with ThreadPoolExecutor(6) as pool:
        results = [pool.submit(sync_caller if t % 2 else async_caller, t) for t in range(6)]
        for thread, result in enumerate(results):
            assert result.result(45) == [[thread, i] for i in range(100)]
