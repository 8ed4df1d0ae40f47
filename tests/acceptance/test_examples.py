"""The scripts in ``examples/`` run as the README says, on the real brokers.

Each script runs in its own process (``python -u``, stdout and stderr merged) on a
queue of its own (``--queue``), which is deleted afterwards. A server is ready once the
library logs that it is "consuming" (its ``Awaiting``/``Waiting`` line is printed
just before it connects).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from queue import SimpleQueue
from urllib.parse import quote

import pytest
from kombu import Connection, Queue

from kombu_rpc.testing import unique_queue_name
from kombu_rpc.topology import BROADCAST_EXCHANGE_TEMPLATE

ROOT = Path(__file__).resolve().parents[2]
READY = "consuming"  # logged by the server once it consumes its request queue

#: (the example, one line of its output, or None once its output ended)
Lines = SimpleQueue[tuple["Example", str | None]]


class Example:
    """One example script (or other Python program, ``argv`` after ``python -u``) in a
    subprocess; a thread collects its output and, if ``lines`` is given, forwards it
    there too."""

    def __init__(self, argv: list[str], label: str, lines: Lines | None) -> None:
        self.label = label
        self.output: list[str] = []
        self.finishing = False
        self.process = subprocess.Popen(
            [sys.executable, "-u", *argv],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, args=(lines,), daemon=True)
        self._reader.start()

    def _read(self, lines: Lines | None) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if lines is not None:
                lines.put((self, line))
        if lines is not None:
            lines.put((self, None))

    def finish(self, signum: int | None = None) -> tuple[int, str]:
        """Signal the process (if ``signum``), wait for it; return its exit code and output."""
        self.finishing = True
        if signum is not None:
            self.process.send_signal(signum)
        code = self.process.wait(30)
        self._reader.join()
        return code, "".join(self.output)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reader.join()
        assert self.process.stdout is not None
        self.process.stdout.close()


def wait_for(lines: Lines, text: str, count: int = 1) -> list[tuple[str, str]]:
    """Read output lines until ``count`` of them contain ``text``; return all lines read.

    Fails at once if a process ends unasked meanwhile; the test's timeout bounds the wait.
    """
    read: list[tuple[str, str]] = []
    seen = 0
    while seen < count:
        example, line = lines.get()
        if line is None:
            if example.finishing:
                continue
            shown = "".join(f"{who}: {text}" for who, text in read)
            raise AssertionError(f"{example.label} exited before printing {text!r}; read so far:\n{shown}")
        read.append((example.label, line))
        seen += text in line
    return read


@pytest.fixture
def example_queue(real_broker_url: str) -> Iterator[str]:
    """A queue name of the test's own; the queue (durable ones survive their servers on
    RabbitMQ) and, on AMQP, its broadcast exchange are deleted at the end.

    On Redis the queue is purged too: a fresh connection's ``queue_delete`` leaves its
    list (and any task left in it) behind.
    """
    name = unique_queue_name("test.examples")
    yield name
    with Connection(real_broker_url) as conn:
        channel = conn.default_channel
        if real_broker_url.startswith("amqp"):
            channel.queue_delete(name)
            channel.exchange_delete(BROADCAST_EXCHANGE_TEMPLATE.format(queue=name))
        else:
            channel.queue_purge(name)
            channel.queue_delete(name)


@pytest.fixture
def lines() -> Lines:
    return SimpleQueue()


@pytest.fixture
def start(real_broker_url: str, example_queue: str, lines: Lines) -> Iterator[Callable[..., Example]]:
    """``start(script, *args, label=script, watch=True)`` runs an example on the test's
    broker and queue; a watched one's output goes to ``lines``. Every process still
    running at the end is killed."""
    started: list[Example] = []

    def run(script: str, *args: str, label: str | None = None, watch: bool = True) -> Example:
        output = lines if watch else None
        argv = [f"examples/{script}", "--broker", real_broker_url, "--queue", example_queue, *args]
        started.append(Example(argv, label or script, output))
        return started[-1]

    yield run
    for example in started:
        example.close()


@pytest.mark.timeout(60)
def test_rpc_client_gets_fib_30_from_rpc_server(start: Callable[..., Example], lines: Lines) -> None:
    # Given the tutorial's RPC server, waiting for requests
    server = start("rpc_server.py")
    assert any(line == " [x] Awaiting RPC requests\n" for _, line in wait_for(lines, READY))
    # When the client asks for fib(30)
    client = start("rpc_client.py", watch=False)
    code, out = client.finish()
    # Then it prints the tutorial's lines and the answer, and exits 0
    assert code == 0, out
    assert out.splitlines() == [" [x] Requesting fib(30)", " [.] Got 832040"]
    # And the server logged the request, and stops cleanly on Ctrl+C
    wait_for(lines, " [.] fib(30)")
    code, out = server.finish(signal.SIGINT)
    assert code == 0, out
    assert out.count(" [.] fib(") == 1, out


# The calls of the tutorial 6 client, made with pika as the tutorial makes them: the
# argument as text to the request queue, with reply_to (an exclusive, server-named queue)
# and a correlation_id; the reply's body read with int().
TUTORIAL_PIKA_CLIENT = """
import sys
import uuid

import pika

url, queue, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
reply_queue = channel.queue_declare(queue="", exclusive=True).method.queue
call_id = str(uuid.uuid4())
bodies = []


def on_reply(channel, method, properties, body):
    if properties.correlation_id == call_id:
        bodies.append(body)


channel.basic_consume(queue=reply_queue, on_message_callback=on_reply, auto_ack=True)
print(f" [x] Requesting fib({n})")
properties = pika.BasicProperties(reply_to=reply_queue, correlation_id=call_id)
channel.basic_publish(exchange="", routing_key=queue, properties=properties, body=str(n))
while not bodies:
    connection.process_data_events(time_limit=1)
print(f" [.] Got {int(bodies[0])}")
connection.close()
"""


def pika_url(url: str) -> str:
    """``url`` as pika reads it: kombu's ``amqp://host//`` means the vhost ``/``, which
    pika spells ``%2F``."""
    with Connection(url) as conn:
        user, password = quote(conn.userid, safe=""), quote(conn.password, safe="")
        return f"amqp://{user}:{password}@{conn.hostname}:{conn.port}/{quote(conn.virtual_host, safe='')}"


@pytest.mark.timeout(60)
def test_the_tutorials_pika_client_gets_fib_from_rpc_server_plain(
    real_broker_url: str, example_queue: str, start: Callable[..., Example], lines: Lines
) -> None:
    if not real_broker_url.startswith("amqp"):
        pytest.skip("the tutorial's client is a pika (AMQP) program")
    # Given the example server, speaking the tutorial's wire format
    server = start("rpc_server.py", "--plain")
    wait_for(lines, READY)
    # When the tutorial's pika client asks for fib(30), then fib(10)
    for n, answer in ((30, 832040), (10, 55)):
        client = subprocess.run(
            [sys.executable, "-c", TUTORIAL_PIKA_CLIENT, pika_url(real_broker_url), example_queue, str(n)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        # Then it gets the answer, as text it can read with int()
        assert client.returncode == 0, client.stderr
        assert client.stdout.splitlines() == [f" [x] Requesting fib({n})", f" [.] Got {answer}"]
        wait_for(lines, f" [.] fib({n})")
    code, out = server.finish(signal.SIGINT)
    assert code == 0, out


@pytest.mark.timeout(60)
def test_rpc_client_plain_gets_fib_30_from_rpc_server_plain(
    start: Callable[..., Example], lines: Lines
) -> None:
    # Given the example server with --plain
    server = start("rpc_server.py", "--plain")
    wait_for(lines, READY)
    # When the example client calls it with --plain too
    code, out = start("rpc_client.py", "--plain", watch=False).finish()
    # Then it prints the tutorial's lines
    assert code == 0, out
    assert out.splitlines() == [" [x] Requesting fib(30)", " [.] Got 832040"]
    assert server.finish(signal.SIGTERM)[0] == 0


@pytest.mark.timeout(60)
def test_rpc_client_without_a_server_prints_one_error_line(
    real_broker_url: str, start: Callable[..., Example]
) -> None:
    # Given no server ever consumed the queue
    # When the client calls (on Redis a request waits for a server until the timeout)
    code, out = start("rpc_client.py", "--timeout", "2", watch=False).finish()
    # Then it says so in one line, with no traceback, and exits 1
    assert code == 1, out
    assert "Traceback" not in out, out
    requesting, error = out.splitlines()
    assert requesting == " [x] Requesting fib(30)"
    assert error.startswith("Error: ") and "examples/rpc_server.py" in error, error
    if real_broker_url.startswith("amqp"):
        assert "no queue" in error, error  # NoServerError, at once
    else:
        assert "no reply" in error, error  # RPCTimeout


def worker_tasks(output: str) -> list[str]:
    """The messages a worker received, checking that it did each before the next."""
    events = [line for line in output.splitlines() if line.startswith((" [x] Received ", " [x] Done"))]
    received = [line for line in events if line != " [x] Done"]
    assert events == [event for line in received for event in (line, " [x] Done")], output
    return [line.removeprefix(" [x] Received ") for line in received]


@pytest.mark.timeout(60)
def test_two_workers_share_the_tasks_fairly(start: Callable[..., Example], lines: Lines) -> None:
    # Given two workers on the durable task queue
    workers = [start("worker.py", label=f"worker {i}") for i in (1, 2)]
    ready = wait_for(lines, READY, count=2)
    assert sum(" [*] Waiting for messages. To exit press CTRL+C" in line for _, line in ready) == 2
    # When four one-second tasks are sent at once
    tasks = ["a.", "b.", "c.", "d."]
    senders = [start("new_task.py", task, watch=False) for task in tasks]
    for sender, task in zip(senders, tasks, strict=True):
        code, out = sender.finish()
        assert (code, out) == (0, f" [x] Sent {task}\n")
    wait_for(lines, " [x] Done", count=len(tasks))
    # Then, once stopped (SIGTERM) cleanly, the workers did each task exactly once
    done: list[list[str]] = []
    for worker in workers:
        code, out = worker.finish(signal.SIGTERM)
        assert code == 0, out
        done.append(worker_tasks(out))
    assert Counter(done[0] + done[1]) == Counter(tasks), done
    # And each got some: a busy worker gets no task (prefetch 1) while another is idle
    assert all(done), done


@pytest.mark.timeout(60)
def test_tasks_wait_in_the_durable_queue_while_no_worker_runs(
    real_broker_url: str, example_queue: str, start: Callable[..., Example], lines: Lines
) -> None:
    # Given a worker declared the task queue, and stopped
    first = start("worker.py", label="first worker")
    wait_for(lines, READY)
    assert first.finish(signal.SIGINT)[0] == 0
    # When a task is sent while no worker runs
    assert start("new_task.py", watch=False).finish() == (0, " [x] Sent Hello World!\n")
    if real_broker_url.startswith("amqp"):
        # Then it is persistent, in a durable queue: redeclaring the queue durable
        # would fail (PRECONDITION_FAILED) if it were not
        with Connection(real_broker_url) as conn:
            conn.default_channel.queue_declare(example_queue, durable=True, auto_delete=False)
            message = Queue(example_queue)(conn.default_channel).get(no_ack=False)
            assert message is not None
            assert message.properties["delivery_mode"] == 2
            message.requeue()
    # And the next worker runs it
    second = start("worker.py", label="second worker")
    wait_for(lines, " [x] Done")
    code, out = second.finish(signal.SIGTERM)
    assert code == 0, out
    assert worker_tasks(out) == ["Hello World!"]


@pytest.mark.timeout(60)
def test_new_task_without_a_worker_says_to_start_one(
    real_broker_url: str, start: Callable[..., Example]
) -> None:
    if not real_broker_url.startswith("amqp"):
        pytest.skip("on Redis a task sent before any worker waits in its list (see examples/README.md)")
    # Given no worker ever declared the task queue
    # When a task is sent
    code, out = start("new_task.py", "lost.", watch=False).finish()
    # Then new_task says what to do, and fails
    assert code == 1
    assert "start a worker first" in out, out
    assert " [x] Sent" not in out
