"""What every proxy's link does, on every broker."""

from __future__ import annotations

from collections.abc import Callable
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
    work = type(link)._work
    failures: list[int] = []

    def fail_once(self: Any, busy: bool) -> None:
        if self is link and busy and not failures:
            failures.append(1)
            raise RuntimeError("a bug in the link")
        work(self, busy)

    monkeypatch.setattr(type(link), "_work", fail_once)
    failed = log_waiter("the link's thread failed")
    # nobody waits on the call: only the link's thread can read its reply, after its
    # failure (a dead thread would leave the future pending until its 30 s timeout)
    future = proxy.echo.call_async("unattended")
    assert future.result(20) == "unattended"
    assert failures and failed.seen.is_set()
