"""Command line of the benchmark suite: choose brokers and scenarios, run, report."""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import functools
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import kombu

import kombu_rpc

from .brokers import Broker, check_reachable, resolve_brokers
from .implementations import Implementation, KombuRPC, source_digest
from .lineup import implementations
from .report import (
    CPU_CLIENT_ONLY,
    CPU_IN_PROCESS,
    Result,
    add_ratios,
    evaluate_targets,
    records,
    table,
    targets_summary,
    write_json_lines,
)
from .scenarios import (
    COMPARED,
    FAMILIES,
    OWN_PROCESS,
    Sample,
    Scenario,
    Settings,
    all_scenarios,
    measure,
    measure_idle,
    measure_processes,
    measure_rss,
    select_scenarios,
)
from .sessions import serving
from .workload import Workload

logger = logging.getLogger("benchmarks")

#: Settings of a full run and of ``--quick``; ``--calls`` and friends override them.
FULL = Settings(calls=5000, rounds=3, rss_calls=100_000, window=30.0, call_timeout=30.0, idle_seconds=2.0)
QUICK = Settings(calls=200, rounds=1, rss_calls=2000, window=2.0, call_timeout=15.0, idle_seconds=0.5)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Benchmark kombu_rpc against a pika tutorial-6 client/server (AMQP) and a raw "
            "kombu request/reply loop, in alternating rounds on the same broker. Prints a "
            "table per broker, the targets with PASS/MISS (reporting only), and JSON lines."
        ),
    )
    parser.add_argument(
        "--broker",
        default="memory,amqp,redis",
        help="comma-separated broker names (memory, amqp, redis) or URLs (default: all three)",
    )
    parser.add_argument(
        "--scenario",
        help=f"comma-separated families ({', '.join(FAMILIES)}) or scenario names (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: a few hundred calls per scenario, one round, short windows",
    )
    parser.add_argument("--calls", type=int, help=f"calls per measurement (default {FULL.calls:,})")
    parser.add_argument("--rounds", type=int, help=f"alternating rounds per scenario (default {FULL.rounds})")
    parser.add_argument(
        "--rss-calls", type=int, help=f"calls between the RSS readings (default {FULL.rss_calls:,})"
    )
    parser.add_argument(
        "--window", type=float, help=f"longest measured window in seconds (default {FULL.window:g})"
    )
    parser.add_argument(
        "--servers",
        choices=("process", "thread"),
        default="process",
        help=(
            "where the servers of the sequential, pipelined, payload and threads scenarios run: "
            "a process of their own, as users run them (default), or a thread of the benchmark "
            "process (memory:// always uses a thread)"
        ),
    )
    parser.add_argument("--json", metavar="PATH", help="write the JSON lines to PATH instead of stdout")
    parser.add_argument("--verbose", "-v", action="store_true", help="log each measurement as it ends")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for name in ("calls", "rounds", "rss_calls"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.window is not None and args.window <= 0:
        parser.error("--window must be positive")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    """The run's settings: ``--quick`` or full, with explicit options on top."""
    base = QUICK if args.quick else FULL
    return Settings(
        calls=args.calls or base.calls,
        rounds=args.rounds or base.rounds,
        rss_calls=args.rss_calls or base.rss_calls,
        window=args.window or base.window,
        call_timeout=base.call_timeout,
        idle_seconds=base.idle_seconds,
    )


def scenario_bound(scenario: Scenario, measurements: int, settings: Settings) -> float:
    """Seconds after which a scenario is stuck: the watchdog then dumps every thread's
    stack and exits. Generous: each measurement gets its window, a call timeout to
    drain, and time to start and stop servers."""
    window = 10 * settings.window if scenario.family == "rss" else settings.window
    return 60 + measurements * (window + 3 * settings.call_timeout + 30)


class Runner:
    """Runs the chosen scenarios on one broker and collects results.

    A measurement that fails is tried once more (the brokers here are shared, and a
    connection cut by someone else must not end a long run); the retry is counted in
    the result. A second failure records the error and the run goes on.
    """

    #: Tries per measurement.
    ATTEMPTS = 2

    def __init__(self, broker: Broker, settings: Settings, verbose: bool, own_process: bool) -> None:
        self.broker = broker
        self.settings = settings
        self.verbose = verbose
        self.own_process = own_process and not broker.in_process
        self.impls = implementations(broker, settings.call_timeout)
        self.results: list[Result] = []

    def run(self, scenarios: list[Scenario]) -> list[Result]:
        """Run ``scenarios`` in order, each under the watchdog."""
        for scenario in scenarios:
            if scenario.family == "processes" and self.broker.in_process:
                continue  # other processes cannot reach memory://
            jobs = self._jobs(scenario)
            started = time.monotonic()
            self._progress(f"{self.broker.name} {scenario.name} ...")
            bound = scenario_bound(scenario, self.ATTEMPTS * len(jobs), self.settings)
            faulthandler.dump_traceback_later(bound, exit=True)
            try:
                for round_no, result, measure_once in jobs:
                    self._attempt(round_no, result, measure_once)
            finally:
                faulthandler.cancel_dump_traceback_later()
            self._progress(f"{self.broker.name} {scenario.name} done in {time.monotonic() - started:.1f}s")
        return self.results

    def _jobs(self, scenario: Scenario) -> list[tuple[int, Result, Callable[[], Sample]]]:
        """The measurements of ``scenario``, in order: for a compared scenario, rounds
        that alternate the order of implementations (A B B A ...), so drift cancels."""

        def result_for(impl: Implementation, scope: str = CPU_IN_PROCESS) -> Result:
            result = Result(self.broker.name, scenario, impl.name, impl.is_kombu_rpc, scope)
            self.results.append(result)
            return result

        impls = [impl for impl in self.impls if impl.families is None or scenario.family in impl.families]
        if scenario.family in COMPARED:
            results = {impl.name: result_for(impl) for impl in impls}
            return [
                (round_no, results[impl.name], functools.partial(self._compared, impl, scenario))
                for round_no in range(self.settings.rounds)
                for impl in (impls if round_no % 2 == 0 else impls[::-1])
            ]
        if scenario.family == "idle":
            return [(0, result_for(impl), functools.partial(self._idle, impl)) for impl in impls]
        kombu_rpc = next(i for i in self.impls if isinstance(i, KombuRPC) and i.confirm_publish)
        if scenario.family == "processes":
            run = functools.partial(measure_processes, self.broker, scenario, self.settings)
            return [(0, result_for(kombu_rpc, CPU_CLIENT_ONLY), run)]
        if scenario.family == "rss":
            scope = CPU_IN_PROCESS if self.broker.in_process else CPU_CLIENT_ONLY
            return [
                (0, result_for(kombu_rpc, scope), functools.partial(measure_rss, kombu_rpc, self.settings))
            ]
        raise ValueError(f"no way to run {scenario.name}")

    def _compared(self, impl: Implementation, scenario: Scenario) -> Sample:
        settings = self.settings
        if impl.window_cap is not None and impl.window_cap < settings.window:
            settings = dataclasses.replace(settings, window=impl.window_cap)
        workload = Workload()
        own_process = self.own_process and scenario.family in OWN_PROCESS
        with serving(impl, workload, scenario.concurrency, own_process) as session:
            return measure(session, workload, scenario, settings)

    def _idle(self, impl: Implementation) -> Sample:
        with serving(impl, Workload(), 1) as session:
            return measure_idle(session, self.settings)

    def _attempt(self, round_no: int, result: Result, measure_once: Callable[[], Sample]) -> None:
        if result.error is not None:
            return  # it failed in an earlier round: no more rounds for it
        label = f"{self.broker.name} {result.scenario.name} {result.impl}"
        for attempt in range(1, self.ATTEMPTS + 1):
            try:
                sample = measure_once()
            except Exception as exc:
                if attempt < self.ATTEMPTS:
                    logger.warning("%s failed (%s: %s); trying once more", label, type(exc).__name__, exc)
                    result.retries += 1
                    continue
                logger.exception("%s failed", label)
                result.error = f"{type(exc).__name__}: {exc}"
                return
            result.samples.append(sample)
            if self.verbose:
                rate = sample.calls / sample.seconds if sample.calls and sample.seconds else 0.0
                self._progress(
                    f"  round {round_no + 1} {result.impl}: {sample.calls} calls, {rate:,.0f} calls/s"
                )
            return

    def _progress(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def header(args: argparse.Namespace, settings: Settings, brokers: list[Broker]) -> dict[str, Any]:
    """What the run was: command, versions, machine, settings."""
    return {
        "kind": "run",
        "command": " ".join(["python -m benchmarks", *args.argv]),
        "python": platform.python_version(),
        "kombu": kombu.__version__,
        "kombu_rpc": kombu_rpc.__version__,
        "kombu_rpc_source_sha256": source_digest(),
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "brokers": [b.name for b in brokers],
        "settings": settings.__dict__,
        "servers": args.servers,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns 0, or 1 if a measurement failed, 2 on bad usage."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = settings_from(args)
    try:
        brokers = resolve_brokers(args.broker)
        scenarios = select_scenarios(all_scenarios(args.quick), args.scenario)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for broker in brokers:
        reason = check_reachable(broker)
        if reason is not None:
            print(f"error: broker {broker.name} ({broker.url}) is unreachable: {reason}", file=sys.stderr)
            return 2
    run_info = header(args, settings, brokers)
    results: list[Result] = []
    notes: dict[str, set[str]] = {}
    for broker in brokers:
        runner = Runner(broker, settings, args.verbose, args.servers == "process")
        results.extend(runner.run(scenarios))
        notes[broker.name] = {impl.note for impl in runner.impls if impl.note}
    add_ratios(results)
    outcomes = evaluate_targets(results)

    run_info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(
        f"kombu_rpc {run_info['kombu_rpc']} (source {run_info['kombu_rpc_source_sha256']}), "
        f"kombu {run_info['kombu']}, Python {run_info['python']}, {run_info['cpus']} CPUs; "
        f"load average {run_info['loadavg'][0]} at start, {run_info['loadavg_end'][0]} at end"
    )
    print(f"command: {run_info['command']}")
    print(
        f"Medians of {settings.rounds} alternating round(s); calls/s over the measured window; "
        f"servers of the sequential, pipelined, payload and threads scenarios in "
        f"{'processes of their own' if args.servers == 'process' else 'threads'} (memory://: threads); "
        "CPU us/call is CPU over the window / calls, of the benchmark process and the server's "
        "(processes_* and rss: the client's only)."
    )
    for broker in brokers:
        print(f"\n== {broker.name} ==")
        print(table(results, outcomes, broker.name))
        for note in sorted(notes[broker.name]):
            print(f"  note: {note}")
    if outcomes:
        print("\nTargets (reporting only):")
        print(targets_summary(outcomes))
    lines = [run_info, *records(results, outcomes)]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as stream:
            write_json_lines(lines, stream)
    else:
        print("\nJSON lines:")
        write_json_lines(lines, sys.stdout)
    failed = [r for r in results if r.error is not None]
    if failed:
        print(f"\n{len(failed)} measurement(s) failed", file=sys.stderr)
        return 1
    return 0
