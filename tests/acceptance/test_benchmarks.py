"""The benchmark suite's smoke run: ``python -m benchmarks --quick`` on each broker.

It checks that the suite runs to the end and reports every scenario x implementation
as a JSON line with sane numbers. It asserts nothing about speed: the targets are
reporting only, and this machine is shared and noisy.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The scenarios ``--quick`` runs, by family.
COMPARED = [
    "sequential",
    "pipelined_k64_c1",
    "pipelined_k64_c8",
    "cast",
    "payload_100B",
    "payload_10KB",
    "payload_1MB",
    "threads_8",
]
#: The implementations compared on each kind of broker.
IMPLS = {
    "memory": ["raw_kombu", "raw_kombu_busypoll", "kombu_rpc", "kombu_rpc_metrics"],
    "amqp": [
        "raw_kombu",
        "raw_kombu_confirms",
        "pika",
        "kombu_rpc",
        "kombu_rpc_metrics",
        "kombu_rpc_noconfirm",
        "kombu_rpc_prefetch4",
    ],
    "redis": ["raw_kombu", "kombu_rpc", "kombu_rpc_metrics"],
}
#: Implementations measured in the pipelined scenarios only, by kind of broker.
PIPELINED_ONLY = {"amqp": ["kombu_rpc_prefetch2", "kombu_rpc_call_async"]}
KINDS = {"memory": "memory", "amqp": "amqp", "pyamqp": "amqp", "redis": "redis"}


def expected_lines(kind: str) -> set[tuple[str, str]]:
    """(scenario, impl) pairs a quick run on a broker of ``kind`` must report."""
    pairs = {(scenario, impl) for scenario in [*COMPARED, "idle"] for impl in IMPLS[kind]}
    pipelined = [scenario for scenario in COMPARED if scenario.startswith("pipelined")]
    pairs |= {(scenario, impl) for scenario in pipelined for impl in PIPELINED_ONLY.get(kind, [])}
    pairs.add(("rss", "kombu_rpc"))
    if kind != "memory":  # server processes cannot reach an in-process broker
        pairs |= {("processes_1", "kombu_rpc"), ("processes_2", "kombu_rpc")}
    return pairs


def positive(line: dict[str, Any], key: str) -> None:
    value = line.get(key)
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, line)


def check_numbers(line: dict[str, Any]) -> None:
    """Every number is finite; throughput, latency, CPU and RSS are positive."""
    for key, value in line.items():
        if isinstance(value, float):
            assert math.isfinite(value), (key, line)
    if line["scenario"] == "idle":
        positive(line, "idle_seconds")
        assert line["idle_cpu_s"] >= 0, line
        return
    for key in ("calls", "calls_per_s", "p50_ms", "p99_ms", "cpu_us_per_call"):
        positive(line, key)
    assert line["p50_ms"] <= line["p99_ms"], line
    if line["scenario"] == "rss":
        positive(line, "rss_before_mb")
        positive(line, "rss_after_mb")
    for name, ratio in line.get("ratios", {}).items():
        assert math.isfinite(ratio) and ratio > 0, (name, line)


@pytest.mark.timeout(200)
def test_quick_benchmark_reports_every_scenario(broker_url: str, tmp_path: Path) -> None:
    kind = KINDS[broker_url.split("://", 1)[0]]
    out = tmp_path / "bench.jsonl"
    # When the quick suite runs on one broker
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--broker", broker_url, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    # Then it finishes cleanly, prints its table, and writes one JSON line per result
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    assert f"== {kind} ==" in run.stdout
    lines = [json.loads(text) for text in out.read_text().splitlines()]
    assert lines[0]["kind"] == "run"
    results = [line for line in lines if line["kind"] == "result"]
    assert {line["broker"] for line in results} == {kind}
    reported = {(line["scenario"], line["impl"]) for line in results}
    assert reported == expected_lines(kind)
    for line in results:
        assert "error" not in line, line
        check_numbers(line)
    # And the servers of the call scenarios ran in processes of their own (their CPU is
    # counted apart), but on memory://, which other processes cannot reach
    assert lines[0]["servers"] == "process"
    for line in results:
        own_process = kind != "memory" and line["family"] in ("sequential", "pipelined", "payload", "threads")
        assert ("server_cpu_us" in line) == own_process, line
    # And every target it checks was measured (PASS or MISS, never "n/a")
    targets = [line for line in lines if line["kind"] == "target"]
    assert targets
    for target in targets:
        assert target["verdict"] in ("PASS", "MISS"), target


@pytest.mark.timeout(150)
def test_reply_to_comparison_reports_both_modes(amqp_url: str) -> None:
    # When the direct reply-to comparison runs briefly on RabbitMQ
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.reply_to", "--calls", "100", "--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Then it reports calls/s for both reply modes, sequential and pipelined, with and
    # without confirms
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    for confirm in ("True", "False"):
        assert f"confirm_publish={confirm}" in run.stdout
    for mode in ("declared reply queue", "direct reply-to"):
        for shape in ("sequential", "64 in flight"):
            assert run.stdout.count(f"{mode}, {shape}") == 2, run.stdout


@pytest.mark.timeout(150)
def test_streaming_comparison_reports_every_way(broker_url: str) -> None:
    # When the streaming benchmark runs briefly on a broker
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.streaming",
            "--broker",
            broker_url,
            "--items",
            "200",
            "--rounds",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Then it reports items/s of a stream, of a list, and of plain calls both ways
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    for way in (
        "one stream",
        "one call returning a list",
        "plain calls, sequential",
        "plain calls, 64 in flight",
    ):
        assert f"  {way} " in run.stdout and "items/s" in run.stdout, run.stdout
