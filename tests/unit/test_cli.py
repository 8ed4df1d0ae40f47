"""The kombu-rpc command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kombu_rpc.cli import main


def test_demo_on_memory_prints_fib_and_a_rate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--calls", "50"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "fib(30) = 832040"
    assert out[1].startswith("50 sequential calls in ") and out[1].endswith(" calls/s")


@pytest.mark.parametrize("broker", ["nosuch://x", "amqp://guest:guest@127.0.0.1:1//"])
def test_demo_reports_a_bad_or_unreachable_broker_as_one_error_line(
    capsys: pytest.CaptureFixture[str], broker: str
) -> None:
    assert main(["demo", "--broker", broker]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and err.count("\n") == 1


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kombu_rpc", "demo", "--calls", "10"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "fib(30) = 832040" in done.stdout
