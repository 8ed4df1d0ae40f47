"""Private broker nodes for tests that cut, restart or kill a broker.

The shared brokers on 127.0.0.1 (RabbitMQ on 5672, Redis on 6379) serve other programs
too: tests may only open, use and close their own connections there. A test that harms
a broker does it to a node of its own from this module: a RabbitMQ node or a
redis-server on free loopback ports, with every file it writes in one temporary
directory.

``stop()`` removes the node whatever happened: a graceful stop first, then ``SIGKILL``
to its process group, then the directory is deleted. An ``atexit`` hook stops the nodes
a test run leaves behind, and a small reaper process does the same if the test process
dies without running it (``SIGKILL``, ``os._exit``).
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import ClassVar, TypeVar

import pytest
import redis

#: Ports a private node never takes: the shared brokers', epmd's, and the range the
#: ``rabbitmqctl`` command line tools listen on (RABBITMQ_CTL_DIST_PORT_MIN..MAX).
RESERVED_PORTS = frozenset({4369, 5672, 6379, 15672, 25672, *range(35672, 35683)})
#: Longest any one command on a node may take (``rabbitmqctl``, a stop).
COMMAND_TIMEOUT = 60.0
#: Longest a node may take to start.
START_TIMEOUT = 120.0


class NodeStartError(RuntimeError):
    """A private node did not come up; the message ends with its logs' last lines."""


def free_port(exclude: set[int] | frozenset[int] = frozenset()) -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice), not a reserved one."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in RESERVED_PORTS and port not in exclude:
            return port
    raise RuntimeError("found no free loopback port")


def missing(reason: str) -> None:
    """Skip the test for a missing broker program, or fail it when brokers are required
    (``KOMBU_RPC_REQUIRE_BROKERS=1``, as in CI), like an unreachable shared broker."""
    if os.environ.get("KOMBU_RPC_REQUIRE_BROKERS") == "1":
        pytest.fail(f"{reason} (KOMBU_RPC_REQUIRE_BROKERS=1)", pytrace=False)
    pytest.skip(reason)


def exit_status(proc: subprocess.Popen[bytes]) -> int | None:
    """The process's exit status once it has exited, else None, without reaping it.

    While the server's process stays unreaped its pid, which is also its process group's
    id, cannot be taken by another process: killing the group then never hits a stranger.
    """
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return -1  # reaped elsewhere
    return None if info is None else info.si_status


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait until the process has exited (without reaping it); its exit status."""
    deadline = time.monotonic() + timeout
    while (status := exit_status(proc)) is None:
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.05)
    return status


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


#: The reaper: waits for EOF on stdin, which comes when the test process is gone, however
#: it ended. Unless it was told ``done`` first, it kills the node's process group and
#: deletes the node's directory.
_REAPER = """
import os, shutil, signal, sys
if sys.stdin.buffer.read() != b"done":
    try:
        os.killpg(int(sys.argv[1]), signal.SIGKILL)
    except OSError:
        pass
    shutil.rmtree(sys.argv[2], ignore_errors=True)
"""

_live: set[PrivateNode] = set()
_live_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    """Last resort: stop the nodes still running when the interpreter exits."""
    with _live_lock:
        nodes = list(_live)
    for node in nodes:
        node.stop()


class PrivateNode:
    """A broker process of this test run's own; use as a context manager."""

    kind: ClassVar[str]

    def __init__(self) -> None:
        self.port = 0
        self.dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reaper: subprocess.Popen[bytes] | None = None
        self._stopped = True
        self._lock = threading.Lock()

    # -- what tests use --------------------------------------------------------------

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        """The server's process id, also its process group's (None before a start)."""
        return None if self._proc is None else self._proc.pid

    def close_all_connections(self) -> None:
        """Drop every client connection the node has."""
        raise NotImplementedError

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this kind of node cannot be started here, or None."""
        raise NotImplementedError

    # -- life cycle ------------------------------------------------------------------

    def start(self, attempts: int = 2) -> None:
        """Start the node and wait until it answers. Another attempt, on fresh ports,
        follows a failed one (a port taken between its choice and its use)."""
        for attempt in range(1, attempts + 1):
            self.dir = Path(tempfile.mkdtemp(prefix=f"kombu-rpc-{self.kind}-"))
            self._stopped = False
            with _live_lock:
                _live.add(self)
            try:
                self._start()
                return
            except NodeStartError:
                self.stop()
                if attempt == attempts:
                    raise
            except BaseException:  # a timeout or an interrupt: leave nothing behind
                self.stop()
                raise

    def stop(self) -> None:
        """Stop the node and delete its directory; it is gone afterwards, whatever
        happens (a graceful stop that fails or hangs ends in ``SIGKILL``)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            if self._proc is not None and exit_status(self._proc) is None:
                try:
                    self._graceful_stop(self._proc)
                except Exception:
                    pass  # the kill below ends it
        finally:
            self._kill()
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
            self._release_reaper()
            with _live_lock:
                _live.discard(self)

    def __enter__(self) -> PrivateNode:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else f"port {self.port}"
        return f"<{type(self).__name__} {state}>"

    # -- for subclasses --------------------------------------------------------------

    def _start(self) -> None:
        raise NotImplementedError

    def _graceful_stop(self, proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()
        wait_exit(proc, COMMAND_TIMEOUT)

    def _logs(self) -> str:
        """The last lines of the node's logs, for a start that failed."""
        assert self.dir is not None
        return _tail(self.dir / "server.out")

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Run the node's server in a session (and process group) of its own, which
        also keeps a Ctrl-C in the terminal from reaching it."""
        assert self.dir is not None
        with open(self.dir / "server.out", "wb") as out:
            self._proc = subprocess.Popen(
                argv,
                env=env,
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._reaper = subprocess.Popen(
            [sys.executable, "-c", _REAPER, str(self._proc.pid), str(self.dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        return self._proc

    def _failed(self, what: str) -> NodeStartError:
        return NodeStartError(f"{self!r}: {what}\n--- its logs end with:\n{self._logs()}")

    def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:  # the whole group, the server and whatever it started, before reaping it
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            proc.wait(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass

    def _release_reaper(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is None or reaper.stdin is None:
            return
        try:
            reaper.stdin.write(b"done")
            reaper.stdin.close()
            reaper.wait(timeout=COMMAND_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            reaper.kill()
            reaper.wait()


# -- RabbitMQ ------------------------------------------------------------------------


def rabbitmq_scripts() -> Path | None:
    """The directory of the package's own ``rabbitmq-server`` and ``rabbitmqctl``.

    Not the wrappers on PATH (``/usr/sbin``): those switch to the ``rabbitmq`` user, whose
    home holds the shared node's Erlang cookie, and log to the shared node's directory.
    """
    candidates: list[str] = []
    if shutil.which("dpkg"):
        try:
            listed = subprocess.run(
                ["dpkg", "-L", "rabbitmq-server"], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.SubprocessError):
            listed = ""
        candidates += [line for line in listed.splitlines() if line.endswith("bin/rabbitmq-server")]
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(found)
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        if real.name == "rabbitmq-server" and (real.parent / "rabbitmqctl").is_file():
            return real.parent
    return None


class PrivateRabbit(PrivateNode):
    """A RabbitMQ node of its own: its name, ports, Erlang cookie, config, data and
    logs, all under one temporary directory."""

    kind = "rabbitmq"

    def __init__(self) -> None:
        super().__init__()
        scripts = rabbitmq_scripts()
        if scripts is None:
            raise NodeStartError(str(self.unavailable_reason()))
        self.scripts = scripts
        self.node = ""
        self.dist_port = 0
        self.env: dict[str, str] = {}

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if rabbitmq_scripts() is None:
            return "rabbitmq-server is not installed: no private RabbitMQ node for the fault tests"
        return None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def pid_file(self) -> Path:
        assert self.dir is not None
        return self.dir / "node.pid"

    def ctl(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` for this node; its output, or an error."""
        done = subprocess.run(
            [str(self.scripts / "rabbitmqctl"), "-n", self.node, "-q", *args],
            env=self.env,
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.node}: {done.stdout}{done.stderr}")
        return done.stdout

    def close_all_connections(self) -> None:
        self.ctl("close_all_connections", "fault test")

    def restart(self) -> None:
        """Stop and start the RabbitMQ application; the Erlang node stays up."""
        self.ctl("stop_app")
        self.ctl("start_app", timeout=START_TIMEOUT)

    def ensure_running(self) -> None:
        """Start the application if a test left it stopped, and wait until it runs."""
        self.ctl("start_app", timeout=START_TIMEOUT)
        self.ctl("await_startup", "--timeout", str(int(START_TIMEOUT)), timeout=START_TIMEOUT + 10)

    def _start(self) -> None:
        assert self.dir is not None
        self.port = free_port()
        self.dist_port = free_port({self.port})
        self.node = f"kombu-rpc-{os.getpid()}-{secrets.token_hex(3)}@localhost"
        home = self.dir / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        files = {
            "rabbitmq.conf": f"listeners.tcp.default = 127.0.0.1:{self.port}\n",
            "advanced.config": "[].\n",
            "rabbitmq-env.conf": "",
            "enabled_plugins": "[].\n",
        }
        for name, text in files.items():
            (self.dir / name).write_text(text)
        # Nothing of the caller's RabbitMQ settings leaks in: every RABBITMQ_ variable
        # is this node's own.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update(
            HOME=str(home),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_PID_FILE=str(self.pid_file),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            # Erlang distribution on loopback only, as the shared node has it
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
            # A VM that crashes (the server, or a rabbitmqctl outliving the node's
            # directory) writes its dump in there, never in the caller's directory
            ERL_CRASH_DUMP=str(self.dir / "erl_crash.dump"),
        )
        self.env = env
        proc = self._spawn([str(self.scripts / "rabbitmq-server")], env)
        waiter = subprocess.Popen(
            [
                str(self.scripts / "rabbitmqctl"),
                "-n",
                self.node,
                "wait",
                "--timeout",
                str(int(START_TIMEOUT)),
                str(self.pid_file),
            ],
            env=env,
            cwd=self.dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT + 10
            while waiter.poll() is None:
                if (status := exit_status(proc)) is not None:
                    raise self._failed(f"rabbitmq-server exited with {status} while starting")
                if time.monotonic() > deadline:
                    raise self._failed(f"not started after {START_TIMEOUT:.0f} s")
                time.sleep(0.2)
            output = waiter.stdout.read().decode(errors="replace") if waiter.stdout else ""
            if waiter.returncode != 0:
                raise self._failed(f"rabbitmqctl wait failed: {output}")
        finally:
            if waiter.poll() is None:
                waiter.kill()
            waiter.wait()
            if waiter.stdout:
                waiter.stdout.close()
        with socket.create_connection(("127.0.0.1", self.port), timeout=10):
            pass  # the AMQP listener answers

    def _graceful_stop(self, proc: subprocess.Popen[bytes]) -> None:
        # ``stop PIDFILE`` returns once the node's process is gone
        self.ctl("stop", str(self.pid_file))
        wait_exit(proc, COMMAND_TIMEOUT)

    def _logs(self) -> str:
        assert self.dir is not None
        parts = [_tail(self.dir / "server.out")]
        parts += [_tail(log) for log in sorted((self.dir / "log").glob("*.log"))]
        return "\n".join(part for part in parts if part)


# -- Redis ---------------------------------------------------------------------------


class PrivateRedis(PrivateNode):
    """A redis-server of its own on a free loopback port, saving nothing."""

    kind = "redis"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if shutil.which("redis-server") is None:
            return "redis-server is not installed: no private Redis server for the fault tests"
        return None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_url(self) -> str:
        """The same server through its Unix socket."""
        assert self.dir is not None
        return f"redis+socket://{self.dir}/redis.sock"

    def client(self) -> redis.Redis:
        """A client of this server (the caller closes it)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10, socket_connect_timeout=10)

    def close_all_connections(self) -> None:
        """Kill every normal client connection (not this command's own)."""
        client = self.client()
        try:
            client.client_kill_filter(_type="normal", skipme=True)
        finally:
            client.close()

    def _start(self) -> None:
        assert self.dir is not None
        server = shutil.which("redis-server")
        if server is None:
            raise NodeStartError(str(self.unavailable_reason()))
        self.port = free_port()
        proc = self._spawn(
            [
                server,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--unixsocket",
                str(self.dir / "redis.sock"),
                "--unixsocketperm",
                "700",
                "--daemonize",
                "no",
            ]
        )
        deadline = time.monotonic() + 30
        while True:
            if (status := exit_status(proc)) is not None:
                raise self._failed(f"redis-server exited with {status} while starting")
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            finally:
                client.close()
            if time.monotonic() > deadline:
                raise self._failed("no PONG after 30 s")
            time.sleep(0.1)


N = TypeVar("N", bound=PrivateNode)


def start_private(cls: type[N]) -> N:
    """A started node of ``cls``; a missing broker program skips the test, or fails it
    when brokers are required. A node that fails to start is an error."""
    reason = cls.unavailable_reason()
    if reason is not None:
        missing(reason)
    node = cls()
    node.start()
    return node
