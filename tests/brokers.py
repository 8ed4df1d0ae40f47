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

``PrivateCluster`` joins three private RabbitMQ nodes into one cluster, whose nodes tests
may ``SIGKILL`` and boot again.
"""

from __future__ import annotations

import atexit
import json
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
#: deletes the node's directory, and the cluster directory holding it if there is one.
_REAPER = """
import os, shutil, signal, sys
if sys.stdin.buffer.read() != b"done":
    try:
        os.killpg(int(sys.argv[1]), signal.SIGKILL)
    except OSError:
        pass
    for path in sys.argv[2:]:
        shutil.rmtree(path, ignore_errors=True)
"""

_live: set[PrivateNode | PrivateCluster] = set()
_live_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    """Last resort: stop the nodes (and clusters) still running when the interpreter exits."""
    with _live_lock:
        nodes = list(_live)
    for node in nodes:
        node.stop()


class PrivateNode:
    """A broker process of this test run's own; use as a context manager."""

    kind: ClassVar[str]

    def __init__(self, base: Path | None = None) -> None:
        """``base``: the directory to create the node's own in (a cluster's), which the
        node's reaper then removes too; by default the system's temporary directory."""
        self.port = 0
        self.base = base
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
            self.dir = Path(tempfile.mkdtemp(prefix=f"kombu-rpc-{self.kind}-", dir=self.base))
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
        with open(self.dir / "server.out", "ab") as out:  # a node booted again appends
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
            [
                sys.executable,
                "-c",
                _REAPER,
                str(self._proc.pid),
                str(self.dir),
                *([str(self.base)] if self.base is not None else []),
            ],
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
    logs, all under one temporary directory.

    A cluster's nodes share one ``home`` (its ``.erlang.cookie``) and one ``base``
    directory, and take their names from ``name``; a lone node has its own of each.
    """

    kind = "rabbitmq"

    def __init__(self, home: Path | None = None, base: Path | None = None, name: str | None = None) -> None:
        super().__init__(base)
        scripts = rabbitmq_scripts()
        if scripts is None:
            raise NodeStartError(str(self.unavailable_reason()))
        self.scripts = scripts
        self.home = home
        self._name = name
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

    @property
    def running(self) -> bool:
        """The node's server process runs (its application may still be booting)."""
        return self._proc is not None and exit_status(self._proc) is None

    def beam_pid(self) -> int | None:
        """The Erlang VM's process id, from the node's pid file (None without one)."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def ctl(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` for this node; its output, or an error."""
        return self.tool("rabbitmqctl", *args, timeout=timeout)

    def tool(self, program: str, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run the package's ``program`` (``rabbitmqctl``, ``rabbitmq-queues``, ...)
        with ``-n NODE -q ARGS`` in this node's environment (its ``HOME``, so its
        cookie); its output, or an error."""
        if not self.node or not self.env:  # never the shared node's defaults
            raise RuntimeError(f"{self!r} has not started: no private node to run {program} for")
        done = subprocess.run(
            [str(self.scripts / program), "-n", self.node, "-q", *args],
            env=self.env,
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} on {self.node}: {done.stdout}{done.stderr}")
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

    def kill(self) -> None:
        """``SIGKILL`` the node as a crash would: its Erlang VM (the pid in its pid
        file) and its whole process group. Its directory stays, for :meth:`start_again`."""
        beam = self.beam_pid()
        if beam is not None and self._proc is not None and self._in_group(beam, self._proc.pid):
            try:
                os.kill(beam, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._kill()  # the group, then the server script is reaped
        self._proc = None  # reaped: its pid may be anyone's now, never signal it again
        self._release_reaper()  # killed, not stopped: the directory stays
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while beam is not None and _alive(beam):  # the VM is reparented and reaped
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.node}: process {beam} still alive after SIGKILL")
            time.sleep(0.02)

    def start_again(self) -> None:
        """Boot a killed node again in its own directory, with the same environment (name,
        ports, cookie, data): a cluster member rejoins its cluster by itself. Returns
        once the node runs."""
        if self._stopped or self.dir is None:
            raise RuntimeError(f"{self!r} was never started, or is stopped for good")
        if self.running:
            raise RuntimeError(f"{self!r} still runs: kill() it first")
        self._boot()

    def _configure(self) -> None:
        """Choose the node's ports and name and write its files and environment."""
        assert self.dir is not None
        self.port = free_port()
        self.dist_port = free_port({self.port})
        self.node = f"{self._name or f'kombu-rpc-{os.getpid()}-{secrets.token_hex(3)}'}@localhost"
        home = self.home
        if home is None:  # a cookie of its own
            home = self.dir / "home"
            home.mkdir()
            write_cookie(home)
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

    def _boot(self) -> None:
        """Start the server and wait until the node runs and its AMQP listener answers."""
        assert self.dir is not None
        # A killed node's pid file names a dead process, which ``wait`` would report
        self.pid_file.unlink(missing_ok=True)
        proc = self._spawn([str(self.scripts / "rabbitmq-server")], self.env)
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
            env=self.env,
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

    def _start(self) -> None:
        self._configure()
        self._boot()

    def _graceful_stop(self, proc: subprocess.Popen[bytes]) -> None:
        # ``stop PIDFILE`` returns once the node's process is gone
        self.ctl("stop", str(self.pid_file))
        wait_exit(proc, COMMAND_TIMEOUT)

    def _logs(self) -> str:
        assert self.dir is not None
        parts = [_tail(self.dir / "server.out")]
        parts += [_tail(log) for log in sorted((self.dir / "log").glob("*.log"))]
        return "\n".join(part for part in parts if part)

    @staticmethod
    def _in_group(pid: int, pgid: int) -> bool:
        """``pid`` is a live process of process group ``pgid`` (not a stranger that
        took a stale pid file's number)."""
        try:
            return os.getpgid(pid) == pgid
        except OSError:
            return False


def write_cookie(home: Path) -> None:
    """A fresh random Erlang cookie in ``home``, readable by its owner only."""
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(20).upper())
    cookie.chmod(0o400)


def _alive(pid: int) -> bool:
    """The process runs (it exists and is not a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z"


class PrivateCluster:
    """``size`` private RabbitMQ nodes (three by default) joined into one cluster.

    The nodes share one ``HOME`` (so one Erlang cookie, for them and for every
    ``rabbitmqctl`` run on them) and one temporary directory, which holds each node's
    own. They start in parallel, then each node but the first joins the first
    (``stop_app``, ``join_cluster``, ``start_app``). Tests may :meth:`kill` a node
    (``SIGKILL``, as a crash) and :meth:`restart` it: it rejoins by itself. ``stop()``
    removes everything, as :meth:`PrivateNode.stop` does, and so do the ``atexit``
    hook and each node's reaper (which also deletes the shared directory).
    """

    kind = "rabbitmq-cluster"

    def __init__(self, size: int = 3) -> None:
        self.size = size
        self.dir: Path | None = None
        self.nodes: list[PrivateRabbit] = []
        self._stopped = True
        self._lock = threading.Lock()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return PrivateRabbit.unavailable_reason()

    # -- what tests use --------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """Each node's AMQP URL, in node order."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """The failover URL of the whole cluster (``amqp://...:P1//;amqp://...:P2//;...``):
        kombu connects to the first node that answers."""
        return ";".join(self.urls)

    def index_of_port(self, port: int) -> int | None:
        """Which node listens for AMQP on ``port``."""
        return next((i for i, node in enumerate(self.nodes) if node.port == port), None)

    def index_of_node(self, name: str) -> int | None:
        """Which node has the Erlang node name ``name``."""
        return next((i for i, node in enumerate(self.nodes) if node.node == name), None)

    def running(self, i: int) -> bool:
        return self.nodes[i].running

    def ctl(self, *args: str, timeout: float = COMMAND_TIMEOUT, program: str = "rabbitmqctl") -> str:
        """Run ``rabbitmqctl ARGS`` (or ``program``) on the first node that runs."""
        for node in self.nodes:
            if node.running:
                return node.tool(program, *args, timeout=timeout)
        raise RuntimeError("no node of the cluster runs")

    def running_nodes(self, i: int) -> set[int]:
        """The nodes that node ``i`` sees running in its cluster (by index; a node that
        is not ours would be -1)."""
        status = json.loads(self.nodes[i].ctl("cluster_status", "--formatter", "json"))
        found = (self.index_of_node(name) for name in status["running_nodes"])
        return {-1 if index is None else index for index in found}

    def wait_cluster_size(self, n: int, timeout: float = START_TIMEOUT) -> None:
        """Wait until every node that runs sees exactly ``n`` nodes running, all of
        them ours and all running here."""

        def view(i: int) -> set[int] | str:
            try:
                return self.running_nodes(i)
            except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
                return f"{type(exc).__name__}: {exc}"[:300]

        deadline = time.monotonic() + timeout
        while True:
            up = sorted(i for i in range(self.size) if self.running(i))
            with ThreadPoolExecutor(max(1, len(up))) as pool:  # one rabbitmqctl per node, at once
                seen = dict(zip(up, pool.map(view, up), strict=True))
            if len(up) == n and all(nodes == set(up) for nodes in seen.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"cluster of {n} not formed after {timeout:.0f} s: nodes {sorted(up)} run, and see {seen}"
                )
            time.sleep(0.2)

    def client_connections(self) -> list[tuple[int, int]]:
        """Each client connection: the node holding it (by index) and the client's own
        port (to tell whose it is)."""
        rows = json.loads(self.ctl("list_connections", "port", "peer_port", "--formatter", "json") or "[]")
        found = [(self.index_of_port(int(row["port"])), int(row["peer_port"])) for row in rows]
        return [(index, port) for index, port in found if index is not None]

    def connections(self) -> dict[int, int]:
        """How many client connections each node holds (every node is listed)."""
        counts = dict.fromkeys(range(self.size), 0)
        for index, _ in self.client_connections():
            counts[index] += 1
        return counts

    def node_holding_connections(self) -> int | None:
        """The node holding the most client connections (None if there are none)."""
        counts = self.connections()
        busiest = max(counts, key=lambda i: counts[i])
        return busiest if counts[busiest] else None

    def queue_info(self, queue: str) -> dict[str, object] | None:
        """``list_queues name type leader members online`` for ``queue`` (None if the
        cluster has no such queue); ``leader``, ``members`` and ``online`` are set for
        quorum queues only."""
        rows = json.loads(
            self.ctl("list_queues", "name", "type", "leader", "members", "online", "--formatter", "json")
            or "[]"
        )
        return next((dict(row) for row in rows if row.get("name") == queue), None)

    def quorum_leader(self, queue: str) -> int | None:
        """The node leading quorum queue ``queue`` (None: no such queue, or no leader)."""
        info = self.queue_info(queue)
        leader = info.get("leader") if info else None
        return self.index_of_node(leader) if isinstance(leader, str) and leader else None

    def quorum_online(self, queue: str) -> set[int]:
        """The nodes whose member of quorum queue ``queue`` is online."""
        info = self.queue_info(queue)
        online = info.get("online") if info else None
        if not isinstance(online, list):
            return set()
        return {i for i in (self.index_of_node(str(name)) for name in online) if i is not None}

    def kill(self, i: int) -> None:
        """``SIGKILL`` node ``i`` (its Erlang VM and its process group), as a crash."""
        self.nodes[i].kill()

    def restart(self, i: int, timeout: float = START_TIMEOUT) -> None:
        """Boot killed node ``i`` again with its environment; returns once it runs and
        every node sees the whole cluster again (the node rejoins by itself)."""
        self.nodes[i].start_again()
        self.wait_cluster_size(self.size, timeout)

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the nodes in parallel, join them into one cluster, and wait until
        each sees all of them running."""
        self.dir = Path(tempfile.mkdtemp(prefix=f"kombu-rpc-{self.kind}-"))
        self._stopped = False
        with _live_lock:
            _live.add(self)
        try:
            home = self.dir / "home"
            home.mkdir()
            write_cookie(home)
            tag = f"kombu-rpc-{os.getpid()}-{secrets.token_hex(3)}"
            self.nodes = [
                PrivateRabbit(home=home, base=self.dir, name=f"{tag}-{i}") for i in range(self.size)
            ]
            _in_parallel([node.start for node in self.nodes], 2 * START_TIMEOUT + 30)
            seed = self.nodes[0]
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", seed.node, timeout=START_TIMEOUT)
                node.ctl("start_app", timeout=START_TIMEOUT)
            self.wait_cluster_size(self.size)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node (in parallel) and delete the cluster's directory."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            _in_parallel([node.stop for node in self.nodes], 2 * COMMAND_TIMEOUT + 30)
        finally:
            for node in self.nodes:
                node.stop()  # a stop that failed above: done if it was not (idempotent)
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
            with _live_lock:
                _live.discard(self)

    def __enter__(self) -> PrivateCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else f"ports {[node.port for node in self.nodes]}"
        return f"<{type(self).__name__} {state}>"


def _in_parallel(tasks: list[Callable[[], object]], timeout: float) -> None:
    """Run each task in a thread of its own; raise the first error, or a
    ``TimeoutError`` if some task still runs after ``timeout`` seconds."""
    errors: list[BaseException] = []

    def run(task: Callable[[], object]) -> None:
        try:
            task()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(task,), daemon=True) for task in tasks]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError(f"tasks still running after {timeout:.0f} s")
    if errors:
        raise errors[0]


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
