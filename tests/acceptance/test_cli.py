"""The kombu-rpc command line as a user runs it, against a real broker.

Servers and callers run as subprocesses. Tests wait on their output lines (read by a
thread each, with a deadline per wait), never on sleeps.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
from kombu import Connection

from kombu_rpc import RPCProxy
from kombu_rpc.topology import request_queue

pytestmark = pytest.mark.timeout(90)

MODULE = textwrap.dedent('''
    import datetime
    import os
    import sys
    import uuid
    from decimal import Decimal

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

    @remote
    def held(value):
        """Return value; with HOLD=1, only after a line arrives on stdin."""
        if os.environ.get("HOLD") == "1":
            print(f"held {value}", file=sys.stderr, flush=True)
            sys.stdin.readline()
        return value

    @remote
    def kinds():
        return {
            "datetime": datetime.datetime(2024, 5, 17, 12, 30, tzinfo=datetime.timezone.utc),
            "date": datetime.date(2024, 5, 17),
            "time": datetime.time(8, 15),
            "decimal": Decimal("1.10"),
            "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
            "bytes": "café".encode(),
            "binary": b"\\xff\\x00",
            "text": "CAFÉ ☕",
        }

    other = Registry()

    @other.remote
    def only_in_other() -> str:
        return "other"
''')

SERVED = ["- fail", "- fib", "- held", "- kinds", "- math.add"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KOMBU_RPC_BROKER_URL", "HOLD")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kombu_rpc", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env() if env is None else env,
    )


class Running:
    """A kombu-rpc subprocess whose output lines are read by threads, so that tests
    can wait for a line with a deadline."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kombu_rpc", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: queue.Queue[str | None] = queue.Queue()
        self.err: queue.Queue[str | None] = queue.Queue()
        self.seen: dict[str, list[str]] = {"out": [], "err": []}
        self._readers = [
            threading.Thread(target=self._read, args=(stream, lines, name), daemon=True)
            for stream, lines, name in (
                (self.process.stdout, self.out, "out"),
                (self.process.stderr, self.err, "err"),
            )
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[str] | None, lines: queue.Queue[str | None], name: str) -> None:
        assert stream is not None
        for line in stream:
            self.seen[name].append(line)
            lines.put(line)
        lines.put(None)

    def next_line(self, stream: str = "out", timeout: float = 30) -> str:
        lines = self.out if stream == "out" else self.err
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no line on std{stream} within {timeout}s; seen: {self.seen}")
        if line is None:
            pytest.fail(f"std{stream} closed (exit {self.process.poll()}); seen: {self.seen}")
        return line.rstrip("\n")

    def wait_for(self, text: str, stream: str = "err", timeout: float = 30) -> str:
        """Wait for a line containing ``text``, up to ``timeout`` seconds."""
        lines = self.out if stream == "out" else self.err
        try:
            while True:
                line = lines.get(timeout=timeout)
                if line is None:
                    pytest.fail(
                        f"std{stream} closed before {text!r} (exit {self.process.poll()}): {self.seen}"
                    )
                if text in line:
                    return line
        except queue.Empty:
            pytest.fail(f"{text!r} not seen on std{stream} within {timeout}s; seen: {self.seen}")

    def release(self) -> None:
        """Let one held call return (it waits for a line on the server's stdin)."""
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def stderr_text(self) -> str:
        for reader in self._readers:
            reader.join(10)
        return "".join(self.seen["err"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "services.py").write_text(MODULE)
    return tmp_path


def servers_on(broker: str, project: Path, queue_name: str) -> Iterator[Callable[..., Running]]:
    """Start ``kombu-rpc serve`` (default: ``services`` on the test's queue); returns
    once it consumes. Every server started is stopped, and the queue deleted, at the end."""
    started: list[Running] = []

    def run(*extra: str, target: str = "services", cwd: Path = project, hold: bool = False) -> Running:
        env = clean_env(HOLD="1") if hold else clean_env()
        args = ["serve", target, "--broker", broker, "--queue", queue_name, *extra]
        server = Running(args, cwd, env)
        started.append(server)
        assert server.next_line().startswith("kombu-rpc serving "), server.seen
        server.wait_for(f"consuming {queue_name!r}")  # logged at INFO once it consumes
        return server

    yield run
    for server in started:
        server.stop()
    with Connection(broker) as conn:
        queue = request_queue(queue_name)(conn.default_channel)
        queue.purge()
        queue.delete()


@pytest.fixture
def start(amqp_url: str, project: Path, queue_name: str) -> Iterator[Callable[..., Running]]:
    """Servers on RabbitMQ (see :func:`servers_on`)."""
    yield from servers_on(amqp_url, project, queue_name)


@pytest.fixture
def start_on_each(real_broker_url: str, project: Path, queue_name: str) -> Iterator[Callable[..., Running]]:
    """Servers on each real broker (see :func:`servers_on`)."""
    yield from servers_on(real_broker_url, project, queue_name)


@pytest.fixture
def served(start: Callable[..., Running]) -> Running:
    return start("--concurrency", "2")


def test_serve_prints_a_banner_with_the_served_functions(
    amqp_url: str, project: Path, queue_name: str
) -> None:
    # Given a module of remote functions, when it is served
    server = Running(
        ["serve", "services", "-b", amqp_url, "-q", queue_name, "-c", "2", "-l", "warning"],
        project,
        clean_env(),
    )
    try:
        banner = [server.next_line() for _ in range(2 + len(SERVED))]
        # Then the banner names the broker (password masked), the queue and the functions
        assert banner[0].startswith("kombu-rpc serving services on amqp://guest:**@127.0.0.1"), banner
        assert banner[1].split() == ["queue:", queue_name, "concurrency:", "2"]
        assert [line.strip() for line in banner[2:]] == SERVED
        # The server answers once the request queue it consumes exists
        with Connection(amqp_url) as conn:
            request_queue(queue_name)(conn.default_channel).declare()
        with RPCProxy(amqp_url, queue=queue_name, timeout=30) as proxy:
            assert proxy.fib(10) == 55
    finally:
        server.stop()
    # And SIGTERM stops it with status 0
    assert server.process.returncode == 0, server.seen


def test_call_prints_the_result_as_json(
    served: Running, amqp_url: str, project: Path, queue_name: str
) -> None:
    env = clean_env(KOMBU_RPC_BROKER_URL=amqp_url)  # broker from the environment
    done = cli("call", "fib", "30", "--queue", queue_name, cwd=project, env=env)
    assert (done.returncode, done.stdout) == (0, "832040\n"), done.stderr
    done = cli(
        "call", "math.add", "hello", "--kwargs", '{"b": " world"}', "-q", queue_name, cwd=project, env=env
    )
    assert done.stdout == '"hello world"\n'
    done = cli("call", "math.add", "[1]", "[2, 3]", "-q", queue_name, "--indent", "2", cwd=project, env=env)
    assert done.stdout == "[\n  1,\n  2,\n  3\n]\n"


def test_call_prints_every_type_the_wire_carries_readably(
    served: Running, amqp_url: str, project: Path, queue_name: str
) -> None:
    # When the result holds datetime, date, time, Decimal, UUID, bytes and non-ASCII text
    done = cli("call", "kinds", "-b", amqp_url, "-q", queue_name, cwd=project)
    # Then it prints as JSON with ISO dates, exact decimals, UUIDs, text as is
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == (
        '{"datetime": "2024-05-17T12:30:00+00:00", "date": "2024-05-17", "time": "08:15:00", '
        '"decimal": "1.10", "uuid": "12345678-1234-5678-1234-567812345678", "bytes": "café", '
        '"binary": "/wA=", "text": "CAFÉ ☕"}\n'
    )


def test_call_reports_remote_errors_on_stderr_and_fails(
    served: Running, amqp_url: str, project: Path, queue_name: str
) -> None:
    done = cli("call", "fail", "bad n", "-b", amqp_url, "-q", queue_name, cwd=project)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "ValueError: bad n\n")
    done = cli("call", "nope", "-b", amqp_url, "-q", queue_name, cwd=project)
    assert done.returncode == 1 and done.stderr.startswith("MethodNotFound: ")
    assert done.stderr.count("\n") == 1
    # With --verbose, the server's traceback comes first
    done = cli("call", "fail", "bad n", "-b", amqp_url, "-q", queue_name, "-v", cwd=project)
    assert done.returncode == 1
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert "raise ValueError(message)" in done.stderr
    assert done.stderr.endswith("\nValueError: bad n\n")


def test_describe_lists_methods_with_signatures(
    served: Running, amqp_url: str, project: Path, queue_name: str
) -> None:
    done = cli("describe", "--broker", amqp_url, "--queue", queue_name, cwd=project)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "fib(n: int) -> int  The n-th Fibonacci number." in lines
    assert "math.add(a, b)" in lines
    assert any(line.startswith("kombu_rpc.ping()") for line in lines)


def test_describe_json_is_machine_readable(
    served: Running, amqp_url: str, project: Path, queue_name: str
) -> None:
    done = cli("describe", "--json", "-b", amqp_url, "-q", queue_name, cwd=project)
    assert done.returncode == 0, done.stderr
    methods = {method["name"]: method for method in json.loads(done.stdout)}
    assert methods["fib"] == {
        "name": "fib",
        "signature": "(n: int) -> int",
        "doc": "The n-th Fibonacci number.",
    }
    assert methods["math.add"] == {"name": "math.add", "signature": "(a, b)", "doc": ""}
    assert "kombu_rpc.describe" in methods


def test_ping_lists_every_server_of_the_queue(
    start: Callable[..., Running], amqp_url: str, project: Path, queue_name: str
) -> None:
    # Given two servers on one queue
    start()
    start()
    # When pinged, both answer, each with its id and queue
    done = cli("ping", "-b", amqp_url, "-q", queue_name, "-t", "2", cwd=project)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3, lines
    assert all(f"queue={queue_name}" in line and "pid=" in line for line in lines[:2]), lines
    assert lines[2] == f"2 servers answered on {queue_name!r}"
    done = cli("ping", "--json", "-b", amqp_url, "-q", queue_name, "-t", "2", cwd=project)
    answers = json.loads(done.stdout)
    assert [answer["queue"] for answer in answers] == [queue_name, queue_name]
    assert len({answer["server_id"] for answer in answers}) == 2


def test_ping_with_no_server_fails(amqp_url: str, project: Path, queue_name: str) -> None:
    done = cli("ping", "-b", amqp_url, "-q", queue_name, "-t", "0.5", cwd=project)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"Error: no server answered on queue {queue_name!r} within 0.5s\n"
    done = cli("ping", "--json", "-b", amqp_url, "-q", queue_name, "-t", "0.5", cwd=project)
    assert (done.returncode, done.stdout) == (1, "[]\n")


def test_call_describe_and_ping_work_on_each_broker(
    start_on_each: Callable[..., Running], real_broker_url: str, project: Path, queue_name: str
) -> None:
    start_on_each()
    broker = ["-b", real_broker_url, "-q", queue_name]
    done = cli("call", "kinds", *broker, cwd=project)
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout)["datetime"] == "2024-05-17T12:30:00+00:00"
    assert json.loads(done.stdout)["text"] == "CAFÉ ☕"
    done = cli("describe", "--json", *broker, cwd=project)
    assert "fib" in {method["name"] for method in json.loads(done.stdout)}
    done = cli("ping", "--json", "-t", "2", *broker, cwd=project)
    assert done.returncode == 0, done.stderr
    assert [answer["queue"] for answer in json.loads(done.stdout)] == [queue_name]


def test_sigterm_stops_serve_with_status_zero(served: Running) -> None:
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(30) == 0
    assert "Traceback" not in served.stderr_text()


def test_serve_a_named_registry(
    start: Callable[..., Running], amqp_url: str, project: Path, queue_name: str
) -> None:
    start(target="services:other")
    done = cli("call", "only_in_other", "-b", amqp_url, "-q", queue_name, cwd=project)
    assert done.stdout == '"other"\n'


def test_serve_a_file_path(
    start: Callable[..., Running],
    amqp_url: str,
    project: Path,
    queue_name: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Given a module file outside the current folder, served by its path
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    start(target=str(project / "services.py"), cwd=elsewhere)
    # Then its functions answer
    done = cli("call", "fib", "10", "-b", amqp_url, "-q", queue_name, cwd=elsewhere)
    assert (done.returncode, done.stdout) == (0, "55\n"), done.stderr


def test_serve_with_a_wrong_password_is_one_error_line(amqp_url: str, project: Path, queue_name: str) -> None:
    with Connection(amqp_url) as conn:
        wrong = f"amqp://{conn.userid}:wrong-password@{conn.hostname}:{conn.port}//"
    done = cli("serve", "services", "-b", wrong, "-q", queue_name, cwd=project)
    assert done.returncode == 1
    assert done.stderr.startswith("Error: cannot connect to amqp://") and "ACCESS_REFUSED" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    done = cli("call", "fib", "1", "-b", wrong, "-q", queue_name, cwd=project)
    assert done.returncode == 1
    assert done.stderr.startswith("Error: ") and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["serve", "services"], 2, "a broker is needed"),
        (["call", "fib", "1"], 2, "a broker is needed"),
        (["describe"], 2, "a broker is needed"),
        (["ping"], 2, "a broker is needed"),
        (["call", "fib", "1", "-b", "memory://"], 2, "memory:// only reaches servers in the same process"),
        (["describe", "-b", "memory://"], 2, "memory:// only reaches servers in the same process"),
        (["ping", "-b", "memory://"], 2, "memory:// only reaches servers in the same process"),
        (
            ["call", "fib", "--kwargs", "b=2", "-b", "amqp://h//"],
            2,
            """--kwargs: expected a JSON object, e.g. '{"b": 2}'""",
        ),
        (["call", "fib", "--kwargs", "[1]", "-b", "amqp://h//"], 2, "--kwargs: expected a JSON object"),
        (
            ["call", "fib", "-t", "-1", "-b", "amqp://h//"],
            2,
            "expected a positive number of seconds, got '-1'",
        ),
        (["serve", "services", "-c", "0", "-b", "amqp://h//"], 2, "expected a positive integer, got '0'"),
        (["call"], 2, "the following arguments are required: method"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
        (["serve", "no_such_module", "-b", "amqp://h//"], 1, "cannot import 'no_such_module'"),
        (["serve", "no_such.py", "-b", "amqp://h//"], 1, "cannot import 'no_such.py': no such file"),
        (["serve", "services:nothing", "-b", "amqp://h//"], 1, "is not a kombu_rpc.Registry"),
        (
            ["serve", "empty", "-b", "amqp://h//"],
            1,
            "empty registers no remote functions; decorate them with @remote",
        ),
        (
            ["serve", "empty.py", "-b", "amqp://h//"],
            1,
            "empty registers no remote functions; decorate them with @remote",
        ),
        (
            ["serve", "broken", "-b", "amqp://h//"],
            1,
            "importing 'broken' failed: ZeroDivisionError: division by zero",
        ),
        (["call", "fib", "1", "-b", "nosuch://h"], 1, "Error: "),
        (["call", "fib", "1", "-b", "amqp://guest:guest@127.0.0.1:1//", "-t", "5"], 1, "Error: "),
    ],
)
def test_errors_are_one_line_and_a_failure_status(
    project: Path, args: list[str], status: int, message: str
) -> None:
    (project / "empty.py").write_text("import kombu_rpc\n")
    (project / "broken.py").write_text("1 / 0\n")
    done = cli(*args, cwd=project, timeout=30)
    assert done.returncode == status, done.stderr
    assert done.stderr.startswith("Error: ") and message in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == ""


def test_verbose_adds_the_traceback(project: Path) -> None:
    done = cli("-v", "serve", "no_such_module", "-b", "amqp://h//", cwd=project)
    assert done.returncode == 1
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert done.stderr.splitlines()[-1].startswith("Error: cannot import 'no_such_module'")
    done = cli("serve", "no_such_module", "-b", "amqp://h//", "--verbose", cwd=project)
    assert done.stderr.startswith("Traceback (most recent call last):")


def test_version(project: Path) -> None:
    done = cli("--version", cwd=project)
    assert done.returncode == 0
    assert done.stdout.startswith("kombu-rpc 0.") and "(kombu 5." in done.stdout
