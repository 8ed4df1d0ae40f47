"""Turning samples into numbers: medians over rounds, ratios, targets, table, JSON lines."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, TextIO

from .scenarios import Sample, Scenario

#: Where the CPU of a measurement was spent.
CPU_IN_PROCESS = "client+server"  # the server's CPU is counted (its thread or its process)
CPU_CLIENT_ONLY = "client"  # the servers ran in other processes, not counted
#: "Idle CPU near zero" means at most this share of one core.
IDLE_CPU_PERCENT_MAX = 1.0
#: Largest acceptable growth of the proxy's RSS, in MB.
RSS_GROWTH_MAX_MB = 5.0
#: The number of calls the RSS target is defined over.
RSS_TARGET_CALLS = 100_000


def percentile(values: list[float], pct: float) -> float:
    """The nearest-rank percentile of ``values`` (which must not be empty)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Result:
    """All samples of one scenario x implementation x broker, and what they add up to."""

    broker: str
    scenario: Scenario
    impl: str
    is_kombu_rpc: bool
    cpu_scope: str
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None
    #: Measurements that failed once and were taken again.
    retries: int = 0
    #: Throughput of this result divided by that of another one, by the other's name.
    ratios: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when it was measured without error."""
        return self.error is None and bool(self.samples)

    def metrics(self) -> dict[str, float]:
        """The medians over rounds: calls/s, p50/p99 latency (ms), CPU per call (µs),
        and the scenario's extra numbers."""
        if not self.ok:
            return {}
        out: dict[str, float] = {}
        timed = [s for s in self.samples if s.calls and s.seconds > 0]
        if timed:
            out["calls_per_s"] = statistics.median(s.calls / s.seconds for s in timed)
            out["p50_ms"] = statistics.median(1000 * percentile(s.latencies, 50) for s in timed)
            out["p99_ms"] = statistics.median(1000 * percentile(s.latencies, 99) for s in timed)
            out["cpu_us_per_call"] = statistics.median(1e6 * s.cpu_seconds / s.calls for s in timed)
        for key in self.samples[0].extra:
            out[key] = statistics.median(s.extra[key] for s in self.samples)
        return out


def add_ratios(results: list[Result]) -> None:
    """Fill in the ratios of each kombu_rpc result: against every baseline in the same
    scenario and broker, against kombu_rpc with confirms (for the no-confirm variant),
    against its own sequential throughput (pipelined), and 2 vs 1 server processes."""
    rates = {(r.broker, r.scenario.name, r.impl): r.metrics().get("calls_per_s") for r in results if r.ok}

    def ratio(mine: float | None, other: float | None) -> float | None:
        return mine / other if mine and other else None

    for result in results:
        if not (result.ok and result.is_kombu_rpc):
            continue
        mine = rates.get((result.broker, result.scenario.name, result.impl))
        others: dict[str, float | None] = {
            other.impl: rates.get((other.broker, other.scenario.name, other.impl))
            for other in results
            if other.broker == result.broker
            and other.scenario.name == result.scenario.name
            and other.impl != result.impl
            and not (other.is_kombu_rpc and other.impl != "kombu_rpc")
        }
        if result.scenario.family == "pipelined":
            others["sequential"] = rates.get((result.broker, "sequential", result.impl))
        if result.scenario.name == "processes_2":
            others["processes_1"] = rates.get((result.broker, "processes_1", result.impl))
        for name, rate in others.items():
            value = ratio(mine, rate)
            if value is not None:
                result.ratios[name] = value


@dataclass(frozen=True)
class Outcome:
    """One performance target, checked against the numbers of a run."""

    broker: str
    scenario: str
    #: What is compared: a ratio key of the kombu_rpc result, or a metric name.
    key: str
    text: str
    threshold: float
    at_least: bool
    value: float | None

    @property
    def passed(self) -> bool | None:
        """True or False, or None when the numbers are missing."""
        if self.value is None:
            return None
        return self.value >= self.threshold if self.at_least else self.value < self.threshold

    @property
    def verdict(self) -> str:
        """PASS, MISS, or n/a."""
        return {True: "PASS", False: "MISS", None: "n/a"}[self.passed]


def evaluate_targets(results: list[Result]) -> list[Outcome]:
    """Check the targets for whatever brokers and scenarios were run. Reporting only:
    a MISS never changes the exit status."""
    ran = {(r.broker, r.scenario.name) for r in results}
    kombu_rpc = {(r.broker, r.scenario.name): r for r in results if r.impl == "kombu_rpc"}
    outcomes: list[Outcome] = []

    def ratio(broker: str, scenario: str, key: str, minimum: float, label: str | None = None) -> None:
        if (broker, scenario) not in ran:
            return
        result = kombu_rpc.get((broker, scenario))
        value = result.ratios.get(key) if result is not None else None
        text = f"{broker} {scenario}: kombu_rpc >= {minimum:g}x {label or key}"
        outcomes.append(Outcome(broker, scenario, key, text, minimum, True, value))

    def metric(broker: str, scenario: str, key: str, limit: float, at_least: bool, text: str) -> None:
        if (broker, scenario) not in ran:
            return
        result = kombu_rpc.get((broker, scenario))
        value = result.metrics().get(key) if result is not None else None
        outcomes.append(Outcome(broker, scenario, key, text, limit, at_least, value))

    ratio("amqp", "sequential", "pika", 1.0, "pika tutorial")
    ratio("amqp", "sequential", "raw_kombu", 1.0)
    ratio("amqp", "pipelined_k64_c8", "sequential", 1.5, "its own sequential")
    for k in (16, 64):  # many calls in flight: the raw loop without, and with, confirms
        for c in (1, 8):
            ratio("amqp", f"pipelined_k{k}_c{c}", "raw_kombu", 0.9, "raw_kombu pipelined")
            ratio("amqp", f"pipelined_k{k}_c{c}", "raw_kombu_confirms", 1.0)
    ratio("redis", "sequential", "raw_kombu", 0.95)
    for broker, scenario in sorted(ran):
        if broker == "redis" and scenario.startswith("pipelined_"):
            ratio("redis", scenario, "raw_kombu", 0.95)
    metric("memory", "sequential", "calls_per_s", 3000, True, "memory sequential: kombu_rpc >= 3,000 calls/s")
    metric(
        "memory",
        "idle",
        "idle_cpu_percent",
        IDLE_CPU_PERCENT_MAX,
        False,
        f"memory idle: proxy + server idle CPU < {IDLE_CPU_PERCENT_MAX:g}% of a core",
    )
    for broker in ("memory", "amqp", "redis"):
        calls = ""
        result = kombu_rpc.get((broker, "rss"))
        if result is not None and result.ok:
            done = result.samples[0].calls
            if done != RSS_TARGET_CALLS:
                calls = f" (measured over {done:,} calls, target is for {RSS_TARGET_CALLS:,})"
        metric(
            broker,
            "rss",
            "rss_growth_mb",
            RSS_GROWTH_MAX_MB,
            False,
            f"{broker} rss: proxy RSS growth < {RSS_GROWTH_MAX_MB:g} MB{calls}",
        )
    return outcomes


# -- output ---------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    return value


def records(results: list[Result], outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """The JSON lines: one per result, then one per target."""
    by_result: dict[tuple[str, str], list[Outcome]] = {}
    for outcome in outcomes:
        by_result.setdefault((outcome.broker, outcome.scenario), []).append(outcome)
    lines: list[dict[str, Any]] = []
    for result in results:
        line: dict[str, Any] = {
            "kind": "result",
            "broker": result.broker,
            "scenario": result.scenario.name,
            "family": result.scenario.family,
            "impl": result.impl,
            **result.scenario.params(),
            "rounds": len(result.samples),
            "calls": sum(s.calls for s in result.samples),
            **result.metrics(),
            "cpu_scope": result.cpu_scope,
        }
        if result.ratios:
            line["ratios"] = result.ratios
        if result.impl == "kombu_rpc":
            mine = by_result.get((result.broker, result.scenario.name), [])
            if mine:
                line["targets"] = {o.text: o.verdict for o in mine}
        if result.retries:
            line["retries"] = result.retries
        if result.error is not None:
            line["error"] = result.error
        lines.append(_clean(line))
    for outcome in outcomes:
        lines.append(
            _clean(
                {
                    "kind": "target",
                    "broker": outcome.broker,
                    "scenario": outcome.scenario,
                    "target": outcome.text,
                    "value": outcome.value,
                    "threshold": outcome.threshold,
                    "verdict": outcome.verdict,
                }
            )
        )
    return lines


def write_json_lines(lines: list[dict[str, Any]], stream: TextIO) -> None:
    """Write one JSON object per line."""
    for line in lines:
        stream.write(json.dumps(line, sort_keys=False) + "\n")


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    if value < 10:
        digits = max(digits, 2)
    return f"{value:,.{digits}f}"


def _remarks(result: Result, outcomes: list[Outcome]) -> str:
    if result.error is not None:
        return f"ERROR: {result.error}"
    metrics = result.metrics()
    parts: list[str] = [f"retried {result.retries}x"] if result.retries else []
    if "server_cpu_us" in metrics:
        parts.append(f"CPU {metrics['client_cpu_us']:,.0f} client + {metrics['server_cpu_us']:,.0f} server")
    if "idle_cpu_percent" in metrics:
        parts.append(f"idle {metrics['idle_seconds']:.1f}s: {metrics['idle_cpu_s']:.3f} CPU-s")
        parts.append(f"{metrics['idle_cpu_percent']:.2f}% of a core")
    if "rss_growth_mb" in metrics:
        parts.append(
            f"RSS {metrics['rss_before_mb']:.1f} -> {metrics['rss_after_mb']:.1f} MB "
            f"({metrics['rss_growth_mb']:+.2f} MB over {result.samples[0].calls:,} calls)"
        )
    checked = {o.key: o for o in outcomes if o.broker == result.broker and o.scenario == result.scenario.name}
    for name, value in result.ratios.items():
        text = f"{value:,.2f}x {name}" if value < 100 else f"{value:,.0f}x {name}"
        outcome = checked.get(name) if result.impl == "kombu_rpc" else None
        if outcome is not None:
            text += f" {outcome.verdict} (>= {outcome.threshold:g})"
        parts.append(text)
    if result.impl == "kombu_rpc":
        for key in ("calls_per_s", "idle_cpu_percent", "rss_growth_mb"):
            outcome = checked.get(key)
            if outcome is not None:
                sign = ">=" if outcome.at_least else "<"
                parts.append(f"{outcome.verdict} ({key} {sign} {outcome.threshold:g})")
    return "; ".join(parts)


def table(results: list[Result], outcomes: list[Outcome], broker: str) -> str:
    """The human table of one broker's results."""
    header = (
        f"{'scenario':<18} {'impl':<20} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/call':>11}  notes"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        if result.broker != broker:
            continue
        metrics = result.metrics()
        row = (
            f"{result.scenario.name:<18} {result.impl:<20} "
            f"{_number(metrics.get('calls_per_s')):>9} {_number(metrics.get('p50_ms'), 2):>8} "
            f"{_number(metrics.get('p99_ms'), 2):>8} {_number(metrics.get('cpu_us_per_call')):>11}  "
            f"{_remarks(result, outcomes)}"
        )
        lines.append(row.rstrip())
    return "\n".join(lines)


def targets_summary(outcomes: list[Outcome]) -> str:
    """One line per target: verdict, measured value, and the target."""
    lines = []
    for outcome in outcomes:
        value = "not measured" if outcome.value is None else f"{outcome.value:,.3g}"
        lines.append(f"  {outcome.verdict:<4} {value:>12}  {outcome.text}")
    return "\n".join(lines)
