"""The proxy-memory scenario, in a process of its own: ``python -m benchmarks.rss``.

``python -m benchmarks.rss URL CALLS WINDOW TIMEOUT`` makes ``CALLS`` calls through one
:class:`~kombu_rpc.RPCProxy` (at most ``WINDOW`` seconds) and prints one JSON object:
a :class:`~benchmarks.scenarios.Sample` whose ``extra`` holds the RSS before and after.
The suite runs it in a fresh interpreter so that memory freed by earlier scenarios
cannot be reused by the proxy and hide its growth. The server runs in yet another
process, except on memory://, which cannot be reached from outside this one.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from time import perf_counter

from .brokers import resolve_brokers
from .implementations import KombuRPC, KombuRPCClient
from .scenarios import RSS_IN_FLIGHT, Meter, Sample, Thinned
from .sessions import serving
from .workload import Workload


def rss_mb() -> float:
    """This process's resident set size in MB (VmRSS from /proc/self/status)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@contextmanager
def _client(impl: KombuRPC) -> Iterator[KombuRPCClient]:
    """A client whose server runs in another process when the broker allows it."""
    with serving(impl, Workload(), 1, own_process=not impl.broker.in_process) as session:
        assert isinstance(session.client, KombuRPCClient)
        yield session.client


def measure(impl: KombuRPC, calls: int, window: float) -> Sample:
    """RSS before and after ``calls`` pipelined calls (``RSS_IN_FLIGHT`` in flight), after
    a warm-up of a tenth as many (at most 1,000) and a ``gc.collect()``. Latency
    percentiles come from (at most) 2,000 evenly spaced calls, so that the benchmark's own
    bookkeeping stays out of the RSS."""
    with _client(impl) as client:
        client.pipeline("fib", (0,), min(1000, max(1, calls // 10)), RSS_IN_FLIGHT, perf_counter() + 60, [])
        latencies = Thinned(max(1, calls // 2000))
        gc.collect()
        before = rss_mb()
        meter = Meter()
        done = client.pipeline("fib", (0,), calls, RSS_IN_FLIGHT, meter.started + window, latencies)
        sample = meter.sample(done, list(latencies))
        gc.collect()
        after = rss_mb()
    sample.extra = {"rss_before_mb": before, "rss_after_mb": after, "rss_growth_mb": after - before}
    return sample


def main(argv: list[str]) -> int:
    """Measure and print the sample as JSON (the last line of standard output)."""
    url, calls, window, timeout = argv
    (broker,) = resolve_brokers(url)
    sample = measure(KombuRPC(broker, float(timeout)), int(calls), float(window))
    print(json.dumps(dataclasses.asdict(sample)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
