"""Every example under docs/examples runs as documented."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kombu_rpc.testing import pytest_plugin_args

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
NEEDS_BROKER = {"serve.py", "call.py"}


def run_example(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in NEEDS_BROKER))
def test_example_runs(name: str) -> None:
    with run_example(str(EXAMPLES / name)) as process:
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, f"{name} failed:\n{out}\n{err}"


def test_the_plugin_example_needs_only_pytest() -> None:
    # Given pytest without the project's test extra (no pytest-timeout, whose `timeout`
    # setting the project's setup.cfg holds)
    command = ["-m", "pytest", "-p", "no:timeout", "-p", "no:cacheprovider", *pytest_plugin_args()]
    # When the plugin example runs as docs/testing.md says
    with run_example(*command, str(EXAMPLES / "test_with_plugin.py")) as process:
        out, err = process.communicate(timeout=60)
    # Then it passes, under the examples' own configuration
    assert process.returncode == 0, f"{out}\n{err}"
    assert "4 passed" in out, out
    assert "Unknown config option" not in out + err


def on_queue(example: str, queue: str, folder: Path) -> str:
    """A copy of ``example`` in ``folder`` that uses ``queue`` for the tutorial's
    ``rpc_queue``: the brokers are shared, and another program may serve that one."""
    source = (EXAMPLES / example).read_text()
    assert source.count('"rpc_queue"') == 1, example
    copy = folder / example
    copy.write_text(source.replace('"rpc_queue"', repr(queue)))
    return str(copy)


def test_serve_and_call_examples_on_a_real_broker(
    real_broker_url: str, queue_name: str, tmp_path: Path
) -> None:
    broker_url = real_broker_url
    with run_example(on_queue("serve.py", queue_name, tmp_path), broker_url) as server:
        assert server.stderr is not None
        for line in server.stderr:  # wait until it consumes
            if "consuming" in line:
                break
        with run_example(on_queue("call.py", queue_name, tmp_path), broker_url) as client:
            out, err = client.communicate(timeout=60)
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert client.returncode == 0, err
    assert "832040" in out
    assert server.returncode == 0
