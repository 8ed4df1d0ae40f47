"""The scenarios, and how one measurement of each is taken.

Every measurement runs a fresh server and client (see
:class:`~benchmarks.implementations.Implementation`), warms them up, then times a
window that ends after at most ``Settings.calls`` calls or ``Settings.window``
seconds, whichever comes first (at least one call always completes).

Where the server runs: in a process of its own for the families in
:data:`OWN_PROCESS` (unless ``--servers thread``), as users run one; in a thread of the
benchmark process for casts (the workload counts them) and idle (which measures proxy
and server together); in other processes for the ``processes`` scenario and the
``rss`` one (which itself runs in a fresh process, see :mod:`benchmarks.rss`). memory://
cannot be reached from other processes: there, every server is a thread. CPU is the
CPU time (user + system, all threads) of the benchmark process plus, when there is one,
the server's process, over the window; ``processes`` and ``rss`` count the client only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from time import perf_counter, process_time
from typing import Any

from kombu_rpc import RPCProxy

from .brokers import Broker, delete_queues, unique_queue
from .implementations import Client, KombuRPC, KombuRPCClient, Session
from .server_process import ROOT, cpu_seconds, server_processes, wait_for_servers
from .workload import Workload

#: Scenario families, in the order they run; ``--scenario`` takes these or full names.
FAMILIES = ("sequential", "pipelined", "cast", "payload", "threads", "processes", "rss", "idle")
#: Families that compare kombu_rpc against baselines in alternating rounds.
COMPARED = ("sequential", "pipelined", "cast", "payload", "threads")
#: Compared families whose server runs in a process of its own (see above).
OWN_PROCESS = ("sequential", "pipelined", "payload", "threads")
#: The CPU-bound call of the ``processes`` scenario.
CPU_BOUND_N = 22
#: Calls in flight in the ``processes`` and ``rss`` scenarios.
PROCESS_IN_FLIGHT = 8
RSS_IN_FLIGHT = 16


@dataclass(frozen=True)
class Scenario:
    """One scenario: a family and its parameters (0 where a parameter does not apply)."""

    name: str
    family: str
    #: Calls in flight (pipelined).
    k: int = 0
    #: Server concurrency (thread pool size; the prefetch of the raw-kombu server).
    concurrency: int = 1
    #: Size in bytes of the echoed string (payload).
    payload: int = 0
    #: Client threads sharing one proxy (threads).
    threads: int = 0
    #: Server processes (processes).
    processes: int = 0

    def params(self) -> dict[str, int]:
        """The parameters that apply, for JSON lines."""
        values = {
            "k": self.k,
            "concurrency": self.concurrency,
            "payload_bytes": self.payload,
            "threads": self.threads,
            "processes": self.processes,
        }
        return {key: value for key, value in values.items() if value}


def all_scenarios(quick: bool) -> list[Scenario]:
    """Every scenario; ``quick`` keeps two of the eight pipelined ones (K=64, both
    server concurrencies), which the targets use."""
    grid = [(64, 1), (64, 8)] if quick else [(k, c) for c in (1, 8) for k in (1, 16, 64, 256)]
    return [
        Scenario("sequential", "sequential"),
        *(Scenario(f"pipelined_k{k}_c{c}", "pipelined", k=k, concurrency=c) for k, c in grid),
        Scenario("cast", "cast"),
        *(
            Scenario(f"payload_{label}", "payload", payload=size)
            for label, size in (("100B", 100), ("10KB", 10_000), ("1MB", 1_000_000))
        ),
        Scenario("threads_8", "threads", threads=8),
        Scenario("processes_1", "processes", processes=1),
        Scenario("processes_2", "processes", processes=2),
        Scenario("rss", "rss"),
        Scenario("idle", "idle"),
    ]


def select_scenarios(scenarios: list[Scenario], spec: str | None) -> list[Scenario]:
    """Keep the scenarios named in ``spec`` (comma-separated families or full names).

    Raises:
        ValueError: A name matches no scenario.
    """
    if not spec:
        return scenarios
    wanted = {part.strip() for part in spec.split(",") if part.strip()}
    known = {s.name for s in scenarios} | {s.family for s in scenarios}
    unknown = wanted - known
    if unknown:
        raise ValueError(f"unknown scenario(s) {sorted(unknown)}; choose from {sorted(known)}")
    return [s for s in scenarios if s.name in wanted or s.family in wanted]


@dataclass(frozen=True)
class Settings:
    """How much each measurement does."""

    #: Calls per measurement (sequential, pipelined, cast, 100 B payload, threads).
    calls: int
    #: Alternating rounds per compared scenario.
    rounds: int
    #: Calls between the two RSS readings.
    rss_calls: int
    #: Longest measured window, in seconds (the rss scenario gets ten times as long).
    window: float
    #: Longest wait for any single reply, in seconds.
    call_timeout: float
    #: Seconds the idle scenario sleeps.
    idle_seconds: float

    def calls_for(self, scenario: Scenario) -> int:
        """How many calls one measurement of ``scenario`` makes (at most)."""
        if scenario.family == "pipelined":
            return max(self.calls, 2 * scenario.k)
        if scenario.family == "payload":
            if scenario.payload >= 1_000_000:
                return max(3, self.calls // 100)
            if scenario.payload >= 10_000:
                return max(10, self.calls // 2)
        if scenario.family == "processes":
            return max(20, self.calls // 2)
        if scenario.family == "rss":
            return self.rss_calls
        return self.calls


class Thinned(list[float]):
    """A list that keeps only every ``step``-th value appended to it: latencies of a long
    run in bounded memory (the RSS scenario must not measure its own bookkeeping)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step
        self.seen = 0

    def append(self, value: float) -> None:
        """Keep ``value`` if it is the ``step``-th since the last one kept."""
        if self.seen % self.step == 0:
            super().append(value)
        self.seen += 1


@dataclass
class Sample:
    """One measured window."""

    calls: int
    seconds: float
    cpu_seconds: float
    #: Per-call latency in seconds (for casts: how long ``cast()`` took to return).
    latencies: list[float] = field(default_factory=list)
    #: Scenario-specific numbers (RSS, idle CPU).
    extra: dict[str, float] = field(default_factory=dict)


class Meter:
    """Wall-clock and CPU time from construction to :meth:`sample`: this process's, and
    the server process's when ``server_pid`` is given."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self.server_cpu_started = 0.0 if server_pid is None else cpu_seconds(server_pid)
        self.started = perf_counter()
        self.cpu_started = process_time()

    def sample(self, calls: int, latencies: list[float], ended: float | None = None) -> Sample:
        """The sample of ``calls`` calls from construction until now (or ``ended``); with
        a server process, its CPU is added and both parts are in ``extra`` per call."""
        cpu = process_time() - self.cpu_started
        seconds = (perf_counter() if ended is None else ended) - self.started
        sample = Sample(calls, seconds, cpu, latencies)
        if self.server_pid is not None:
            server_cpu = cpu_seconds(self.server_pid) - self.server_cpu_started
            sample.cpu_seconds += server_cpu
            per_call = 1e6 / max(1, calls)
            sample.extra = {"client_cpu_us": cpu * per_call, "server_cpu_us": server_cpu * per_call}
        return sample


def _warm_up(client: Client, calls: int = 20, seconds: float = 0.5) -> None:
    """A few calls, at least one, so connections and threads exist before timing."""
    deadline = perf_counter() + seconds
    done = 0
    while done < calls and (done == 0 or perf_counter() < deadline):
        client.call("fib", 0)
        done += 1


def _sequential(
    client: Client, method: str, args: tuple[Any, ...], n: int, window: float, server_pid: int | None
) -> Sample:
    latencies: list[float] = []
    meter = Meter(server_pid)
    deadline = meter.started + window
    while len(latencies) < n and (not latencies or perf_counter() < deadline):
        started = perf_counter()
        client.call(method, *args)
        latencies.append(perf_counter() - started)
    return meter.sample(len(latencies), latencies)


def measure(session: Session, workload: Workload, scenario: Scenario, settings: Settings) -> Sample:
    """Take one measurement of a compared scenario (sequential, pipelined, cast,
    payload, threads) on a running session."""
    client = session.client
    n = settings.calls_for(scenario)
    _warm_up(client)
    if scenario.family == "sequential":
        return _sequential(client, "fib", (0,), n, settings.window, session.server_pid)
    if scenario.family == "payload":
        value = "x" * scenario.payload
        if client.call("echo", value) != value:
            raise AssertionError("echo returned something else")
        return _sequential(client, "echo", (value,), n, settings.window, session.server_pid)
    if scenario.family == "pipelined":
        latencies: list[float] = []
        meter = Meter(session.server_pid)
        calls = client.pipeline("fib", (0,), n, scenario.k, meter.started + settings.window, latencies)
        return meter.sample(calls, latencies)
    if scenario.family == "cast":
        return _casts(client, workload, n, settings)
    if scenario.family == "threads":
        return _threads(session, scenario.threads, n, settings)
    raise ValueError(f"{scenario.name} is not a compared scenario")


def _casts(client: Client, workload: Workload, n: int, settings: Settings) -> Sample:
    """Cast ``n`` times, then wait until the server has run them all."""
    latencies: list[float] = []
    meter = Meter()
    deadline = meter.started + settings.window
    while len(latencies) < n and (not latencies or perf_counter() < deadline):
        started = perf_counter()
        client.cast("count")
        latencies.append(perf_counter() - started)
    if not workload.wait_count(len(latencies), settings.call_timeout):
        raise TimeoutError(f"the server ran {workload.count} of {len(latencies)} casts")
    return meter.sample(len(latencies), latencies, ended=workload.last_count_at)


def _threads(session: Session, threads: int, n: int, settings: Settings) -> Sample:
    """``threads`` threads, each with a client from the session, share ``n`` calls."""
    per_thread = max(1, n // threads)
    start = threading.Barrier(threads + 1, timeout=settings.call_timeout + 10)
    finish = threading.Barrier(threads + 1, timeout=settings.window + settings.call_timeout + 10)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def worker(mine: list[float]) -> None:
        try:
            client = session.open_client()
            client.call("fib", 0)
        except BaseException as exc:
            errors.append(exc)
            start.abort()
            return
        try:
            start.wait()
            deadline = perf_counter() + settings.window
            try:
                while len(mine) < per_thread and (not mine or perf_counter() < deadline):
                    started = perf_counter()
                    client.call("fib", 0)
                    mine.append(perf_counter() - started)
            except BaseException as exc:
                errors.append(exc)
            finish.wait()
        except threading.BrokenBarrierError:
            pass
        finally:
            client.close()

    workers = [threading.Thread(target=worker, args=(mine,), daemon=True) for mine in latencies]
    for thread in workers:
        thread.start()
    try:
        start.wait()
        meter = Meter(session.server_pid)
        finish.wait()
        sample = meter.sample(sum(map(len, latencies)), [x for mine in latencies for x in mine])
    except threading.BrokenBarrierError:
        sample = None
    for thread in workers:
        thread.join(settings.call_timeout + 10)
    if errors:
        raise errors[0]
    if sample is None:
        raise RuntimeError("a worker thread did not start")
    return sample


# -- kombu_rpc only ---------------------------------------------------------------------


def measure_processes(broker: Broker, scenario: Scenario, settings: Settings) -> Sample:
    """kombu_rpc calls of CPU-bound ``fib(22)`` served by ``scenario.processes`` server
    processes, :data:`PROCESS_IN_FLIGHT` calls in flight. CPU is the client's only."""
    queue = unique_queue()
    try:
        with (
            server_processes(broker, queue, scenario.processes) as processes,
            RPCProxy(broker.url, queue=queue, timeout=settings.call_timeout) as proxy,
        ):
            wait_for_servers(proxy, processes, timeout=60.0)
            client = KombuRPCClient(proxy, settings.call_timeout)
            client.pipeline(
                "fib", (CPU_BOUND_N,), 2 * scenario.processes, PROCESS_IN_FLIGHT, perf_counter() + 60, []
            )
            latencies: list[float] = []
            meter = Meter()
            calls = client.pipeline(
                "fib",
                (CPU_BOUND_N,),
                settings.calls_for(scenario),
                PROCESS_IN_FLIGHT,
                meter.started + settings.window,
                latencies,
            )
            return meter.sample(calls, latencies)
    finally:
        delete_queues(broker, [queue])


def measure_rss(impl: KombuRPC, settings: Settings) -> Sample:
    """Proxy RSS before and after ``rss_calls`` calls, measured in a fresh process
    (``python -m benchmarks.rss``, see :mod:`benchmarks.rss`): in this long-lived one,
    memory freed by earlier scenarios would be reused and hide the proxy's growth."""
    window = 10 * settings.window
    command = [sys.executable, "-m", "benchmarks.rss", impl.broker.url, str(settings.rss_calls)]
    command += [str(window), str(impl.call_timeout)]
    run = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=window + 3 * impl.call_timeout + 60
    )
    if run.returncode != 0:
        raise RuntimeError(f"benchmarks.rss exited with {run.returncode}: {run.stderr[-2000:]}")
    data = json.loads(run.stdout.strip().splitlines()[-1])
    return Sample(**data)


def measure_idle(session: Session, settings: Settings) -> Sample:
    """CPU seconds the process uses while a warmed-up server and client sit idle."""
    _warm_up(session.client, calls=5)
    time.sleep(0.2)
    meter = Meter()
    time.sleep(settings.idle_seconds)
    sample = meter.sample(0, [])
    sample.extra = {
        "idle_seconds": sample.seconds,
        "idle_cpu_s": sample.cpu_seconds,
        "idle_cpu_percent": 100 * sample.cpu_seconds / sample.seconds,
    }
    return sample
