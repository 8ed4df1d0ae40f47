"""Load on the real brokers: 20 threads x 500 calls over 2 servers. Run alone with ``-m load``."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kombu_rpc import RPCProxy, RPCServer

from ..conftest import broker_id

pytestmark = [pytest.mark.load, pytest.mark.timeout(300)]
REAL_BROKERS_ONLY = True

THREADS, CALLS = 20, 500


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_twenty_threads_by_five_hundred_calls_over_two_servers(
    broker_url: str,
    serve: Callable[..., RPCServer],
    proxies: Callable[..., RPCProxy],
    capsys: pytest.CaptureFixture[str],
) -> None:
    serve(concurrency=4)
    serve(concurrency=4)
    proxy = proxies(timeout=60)

    def worker(thread: int, calls: int) -> int:
        matched = 0
        for i in range(calls):
            matched += proxy.echo([thread, i, "x" * (i % 64)]) == [thread, i, "x" * (i % 64)]
        return matched

    with ThreadPoolExecutor(THREADS) as pool:
        # warm up (caches, pools, thread stacks), then measure
        assert sum(pool.map(worker, range(THREADS), [25] * THREADS)) == THREADS * 25
        before = rss_mb()
        matched = sum(pool.map(worker, range(THREADS), [CALLS] * THREADS))
        after = rss_mb()
    assert matched == THREADS * CALLS  # every result matches its own arguments: no crossed replies
    with capsys.disabled():
        print(
            f"\n  load {broker_id(broker_url)}: {THREADS}x{CALLS} calls, all matched; "
            f"process RSS (proxy + 2 servers) {before:.1f} -> {after:.1f} MB"
        )
    assert after - before < 20, f"RSS grew {after - before:.1f} MB over {THREADS * CALLS} calls"
