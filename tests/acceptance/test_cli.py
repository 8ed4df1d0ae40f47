"""The kombu-rpc command line as a user runs it, against a real broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection

from kombu_rpc import RPCProxy
from kombu_rpc.topology import request_queue

MODULE = textwrap.dedent('''
    from kombu_rpc import Registry, remote

    @remote
    def fib(n: int) -> int:
        """The n-th Fibonacci number."""
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a

    @remote(name="math.add")
    def add(a, b):
        return a + b

    @remote
    def fail(message: str) -> None:
        raise ValueError(message)

    other = Registry()

    @other.remote
    def only_in_other() -> str:
        return "other"
''')


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kombu_rpc", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "services.py").write_text(MODULE)
    return tmp_path


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KOMBU_RPC_BROKER_URL"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    env.update(extra)
    return env


@pytest.fixture
def served(amqp_url: str, project: Path, queue_name: str) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kombu_rpc",
            "serve",
            "services",
            "--broker",
            amqp_url,
            "--queue",
            queue_name,
            "--concurrency",
            "2",
            "--loglevel",
            "warning",
        ],
        cwd=project,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        banner = [process.stdout.readline() for _ in range(5)]
        assert banner[0].startswith("kombu-rpc serving services on amqp://guest:**@127.0.0.1"), banner
        assert f"queue: {queue_name}" in banner[1]
        assert [line.strip() for line in banner[2:]] == ["- fail", "- fib", "- math.add"]
        # The banner comes before the server consumes (and handles signals): wait for
        # that with a ping, sent to the queue declared here, so that it waits for the server
        with Connection(amqp_url) as conn:
            request_queue(queue_name)(conn.default_channel).declare()
        with RPCProxy(amqp_url, queue=queue_name, timeout=30) as proxy:
            proxy.kombu_rpc.ping()
        try:
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            process.communicate(timeout=30)


def test_call_prints_the_result_as_json(
    served: object, amqp_url: str, project: Path, queue_name: str
) -> None:
    env = clean_env(KOMBU_RPC_BROKER_URL=amqp_url)  # broker from the environment
    done = cli("call", "fib", "30", "--queue", queue_name, cwd=project, env=env)
    assert (done.returncode, done.stdout) == (0, "832040\n"), done.stderr
    done = cli(
        "call",
        "math.add",
        "hello",
        "--kwargs",
        '{"b": " world"}',
        "--queue",
        queue_name,
        cwd=project,
        env=env,
    )
    assert done.stdout == '"hello world"\n'
    done = cli("call", "math.add", "[1]", "[2, 3]", "--queue", queue_name, cwd=project, env=env)
    assert done.stdout == "[1, 2, 3]\n"


def test_call_reports_remote_errors_on_stderr_and_fails(
    served: object, amqp_url: str, project: Path, queue_name: str
) -> None:
    done = cli(
        "call", "fail", "bad n", "--broker", amqp_url, "--queue", queue_name, cwd=project, env=clean_env()
    )
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "ValueError: bad n\n")
    done = cli("call", "nope", "--broker", amqp_url, "--queue", queue_name, cwd=project, env=clean_env())
    assert done.returncode == 1 and done.stderr.startswith("MethodNotFound: ")


def test_describe_lists_methods_with_signatures(
    served: object, amqp_url: str, project: Path, queue_name: str
) -> None:
    done = cli("describe", "--broker", amqp_url, "--queue", queue_name, cwd=project, env=clean_env())
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "fib(n: int) -> int  The n-th Fibonacci number." in lines
    assert "math.add(a, b)" in lines
    assert any(line.startswith("kombu_rpc.ping()") for line in lines)


def test_sigterm_stops_serve_with_status_zero(served: subprocess.Popen[str]) -> None:
    served.send_signal(signal.SIGTERM)
    assert served.wait(30) == 0


def test_serve_a_named_registry(amqp_url: str, project: Path, queue_name: str) -> None:
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kombu_rpc",
            "serve",
            "services:other",
            "--broker",
            amqp_url,
            "--queue",
            queue_name,
        ],
        cwd=project,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        banner = [process.stdout.readline() for _ in range(3)]
        assert banner[2].strip() == "- only_in_other"
        done = cli(
            "call", "only_in_other", "--broker", amqp_url, "--queue", queue_name, cwd=project, env=clean_env()
        )
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
    assert done.stdout == '"other"\n'
    assert process.returncode == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "services"], "a broker is needed"),
        (["call", "fib", "1"], "a broker is needed"),
        (["describe"], "a broker is needed"),
        (["serve", "no_such_module", "--broker", "memory://"], "cannot import 'no_such_module'"),
        (["serve", "services:nothing", "--broker", "memory://"], "is not a kombu_rpc.Registry"),
        (["call", "fib", "--kwargs", "[1]", "--broker", "memory://"], "--kwargs must be a JSON object"),
        (["call", "fib", "--kwargs", "{bad", "--broker", "memory://"], "Error: "),
    ],
)
def test_user_errors_are_one_line_and_a_failure_status(project: Path, args: list[str], message: str) -> None:
    done = cli(*args, cwd=project, env=clean_env())
    assert done.returncode == 1
    assert done.stderr.startswith("Error: ") and message in done.stderr and done.stderr.count("\n") == 1, (
        done.stderr
    )
