"""The tutorials 1, 3, 4 and 5 in ``examples/`` (hello world, fanout, direct, topic) run
as the README says, on the real brokers, and talk to the tutorials' own pika programs.

Each test runs the scripts in their own processes (see :mod:`.test_examples`), on a
request queue and an exchange of its own (``--queue``, ``--exchange``), deleted
afterwards. ``memory://`` does not apply: its broker lives inside one process.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from queue import SimpleQueue

import pytest
from kombu import Connection

from kombu_rpc.testing import unique_queue_name
from kombu_rpc.topology import BROADCAST_EXCHANGE_TEMPLATE

from .test_examples import READY, Example, Lines, pika_url, wait_for

pytestmark = pytest.mark.timeout(60)

WAITING = " [*] Waiting for logs. To exit press CTRL+C"

# The tutorials' pika programs, as the tutorials write them, with the exchange, queue
# and keys from the command line. One change: they declare their exchanges durable,
# as kombu_rpc does (RabbitMQ refuses to declare an exchange again with another
# durability: PRECONDITION_FAILED); see examples/README.md.
PIKA_SEND = """
import sys

import pika

url, queue = sys.argv[1:3]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.queue_declare(queue=queue)
channel.basic_publish(exchange="", routing_key=queue, body="Hello World!")
print(" [x] Sent 'Hello World!'")
connection.close()
"""

PIKA_RECEIVE = """
import sys

import pika

url, queue = sys.argv[1:3]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.queue_declare(queue=queue)


def callback(ch, method, properties, body):
    print(f" [x] Received {body!r}")


channel.basic_consume(queue=queue, on_message_callback=callback, auto_ack=True)
print(" [*] Waiting for messages. To exit press CTRL+C")
channel.start_consuming()
"""

# emit_log.py, emit_log_direct.py and emit_log_topic.py in one: the exchange type and
# the routing key (empty for fanout) come from the command line.
PIKA_EMIT = """
import sys

import pika

url, exchange, exchange_type, routing_key, message = sys.argv[1:6]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.exchange_declare(exchange=exchange, exchange_type=exchange_type, durable=True)
channel.basic_publish(exchange=exchange, routing_key=routing_key, body=message)
print(f" [x] Sent {routing_key!r}:{message!r}")
connection.close()
"""

# receive_logs.py, receive_logs_direct.py and receive_logs_topic.py in one: one
# exclusive, server-named queue bound with each key (fanout: one empty key).
PIKA_RECEIVE_LOGS = """
import sys

import pika

url, exchange, exchange_type, *keys = sys.argv[1:]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.exchange_declare(exchange=exchange, exchange_type=exchange_type, durable=True)
queue_name = channel.queue_declare(queue="", exclusive=True).method.queue
for key in keys or [""]:
    channel.queue_bind(exchange=exchange, queue=queue_name, routing_key=key)
print(" [*] Waiting for logs. To exit press CTRL+C")


def callback(ch, method, properties, body):
    if exchange_type == "fanout":
        print(f" [x] {body!r}")
    else:
        print(f" [x] {method.routing_key!r}:{body!r}")


channel.basic_consume(queue=queue_name, on_message_callback=callback, auto_ack=True)
channel.start_consuming()
"""


@dataclass(frozen=True)
class Names:
    """The test's own request queue (``--queue``) and exchange (``--exchange``)."""

    queue: str
    exchange: str


@pytest.fixture
def names(real_broker_url: str) -> Iterator[Names]:
    """Fresh names; at the end the queue, the exchange and (on AMQP) the queue's
    broadcast exchange are deleted, and on Redis the exchange's binding table and any
    event queue a killed receiver left."""
    chosen = Names(unique_queue_name("test.examples"), unique_queue_name("test.examples.logs"))
    yield chosen
    with Connection(real_broker_url) as conn:
        channel = conn.default_channel
        if real_broker_url.startswith("amqp"):
            channel.queue_delete(chosen.queue)
            channel.exchange_delete(BROADCAST_EXCHANGE_TEMPLATE.format(queue=chosen.queue))
            channel.exchange_delete(chosen.exchange)
        else:
            channel.queue_purge(chosen.queue)
            channel.queue_delete(chosen.queue)
            client = channel.client
            leftovers = list(client.scan_iter(match=f"kombu_rpc.events.{chosen.exchange}.*"))
            client.delete(
                f"_kombu.binding.{chosen.exchange}", f"_kombu.binding_permanent.{chosen.exchange}", *leftovers
            )


@pytest.fixture
def lines() -> Lines:
    return SimpleQueue()


@dataclass
class Runner:
    """Starts the example scripts and the tutorial's pika programs on the test's broker
    and names; their output goes to ``lines`` (unless ``watch=False``)."""

    url: str
    names: Names
    lines: Lines
    started: list[Example]

    def example(self, script: str, *args: str, label: str | None = None, watch: bool = True) -> Example:
        argv = [f"examples/{script}", "--broker", self.url]
        if script.startswith("receive"):  # servers: their request queue
            argv += ["--queue", self.names.queue]
        if script == "send.py":
            argv += ["--queue", self.names.queue]
        if "_log" in script:
            argv += ["--exchange", self.names.exchange]
        return self._start([*argv, *args], label or script, watch)

    def pika(self, program: str, *args: str, label: str, watch: bool = True) -> Example:
        return self._start(["-c", program, pika_url(self.url), *args], label, watch)

    def _start(self, argv: list[str], label: str, watch: bool) -> Example:
        self.started.append(Example(argv, label, self.lines if watch else None))
        return self.started[-1]


@pytest.fixture
def run(real_broker_url: str, names: Names, lines: Lines) -> Iterator[Runner]:
    """Every process still running at the end is killed."""
    runner = Runner(real_broker_url, names, lines, [])
    yield runner
    for example in runner.started:
        example.close()


def needs_amqp(url: str) -> None:
    if not url.startswith("amqp"):
        pytest.skip("the tutorial's programs are pika (AMQP) programs")


def printed(example: Example, prefix: str = " [x] ") -> list[str]:
    """The lines ``example`` printed that start with ``prefix``, once it stopped cleanly
    on Ctrl+C."""
    code, out = example.finish(signal.SIGINT)
    assert code == 0, out
    assert "Traceback" not in out, out
    return [line for line in out.splitlines() if line.startswith(prefix)]


def emitted(run: Runner, script: str, *args: str) -> str:
    """What an emitter printed; it must exit 0."""
    code, out = run.example(script, *args, watch=False).finish()
    assert code == 0, out
    return out


# Tutorial 1: hello world


def test_receive_prints_what_send_sends(run: Runner, lines: Lines) -> None:
    # Given receive.py, waiting on its queue
    receiver = run.example("receive.py")
    ready = wait_for(lines, READY)
    assert any(line == " [*] Waiting for messages. To exit press CTRL+C\n" for _, line in ready)
    # When send.py sends (twice)
    for _ in range(2):
        assert emitted(run, "send.py") == " [x] Sent 'Hello World!'\n"
    # Then receive.py prints each message, as text
    wait_for(lines, " [x] Received", count=2)
    assert printed(receiver) == [" [x] Received 'Hello World!'"] * 2


def test_send_without_receive_says_to_start_it(real_broker_url: str, run: Runner) -> None:
    if not real_broker_url.startswith("amqp"):
        pytest.skip("on Redis a message sent before any receiver waits in its list (see examples/README.md)")
    code, out = run.example("send.py", watch=False).finish()
    assert code == 1
    assert "start examples/receive.py first" in out, out
    assert " [x] Sent" not in out


def test_receive_prints_what_the_tutorials_pika_send_sends(
    real_broker_url: str, names: Names, run: Runner, lines: Lines
) -> None:
    needs_amqp(real_broker_url)
    receiver = run.example("receive.py")
    wait_for(lines, READY)
    sender = run.pika(PIKA_SEND, names.queue, label="pika send.py", watch=False)
    assert sender.finish() == (0, " [x] Sent 'Hello World!'\n")
    wait_for(lines, " [x] Received")
    assert printed(receiver) == [" [x] Received 'Hello World!'"]


def test_the_tutorials_pika_receive_prints_what_send_sends(
    real_broker_url: str, names: Names, run: Runner, lines: Lines
) -> None:
    needs_amqp(real_broker_url)
    run.pika(PIKA_RECEIVE, names.queue, label="pika receive.py")
    wait_for(lines, " [*] Waiting for messages")
    assert emitted(run, "send.py") == " [x] Sent 'Hello World!'\n"
    # the tutorial's own line: the body is bare text, not a JSON envelope
    assert wait_for(lines, " [x] Received")[-1] == ("pika receive.py", " [x] Received b'Hello World!'\n")


# Tutorial 3: publish/subscribe (fanout)


def test_every_receive_logs_gets_each_line(run: Runner, lines: Lines) -> None:
    # Given two receivers on the fanout exchange
    receivers = [run.example("receive_logs.py", label=f"receiver {i}") for i in (1, 2)]
    ready = wait_for(lines, READY, count=2)
    assert sum(line == WAITING + "\n" for _, line in ready) == 2
    # When two lines are emitted
    assert emitted(run, "emit_log.py") == " [x] Sent 'info: Hello World!'\n"
    assert emitted(run, "emit_log.py", "warning:", "disk", "full") == " [x] Sent 'warning: disk full'\n"
    # Then each receiver prints both, in order
    wait_for(lines, " [x] 'warning: disk full'", count=2)
    for receiver in receivers:
        assert printed(receiver) == [" [x] 'info: Hello World!'", " [x] 'warning: disk full'"]


def test_the_tutorials_pika_emit_log_reaches_receive_logs(
    real_broker_url: str, names: Names, run: Runner, lines: Lines
) -> None:
    needs_amqp(real_broker_url)
    receiver = run.example("receive_logs.py")
    wait_for(lines, READY)
    emitter = run.pika(
        PIKA_EMIT, names.exchange, "fanout", "", "info: Hello World!", label="pika emit_log.py", watch=False
    )
    assert emitter.finish()[0] == 0
    # a body without a content type is text
    wait_for(lines, " [x] 'info: Hello World!'")
    assert printed(receiver) == [" [x] 'info: Hello World!'"]


def test_emit_log_reaches_the_tutorials_pika_receive_logs(
    real_broker_url: str, names: Names, run: Runner, lines: Lines
) -> None:
    needs_amqp(real_broker_url)
    run.pika(PIKA_RECEIVE_LOGS, names.exchange, "fanout", label="pika receive_logs.py")
    wait_for(lines, WAITING)
    assert emitted(run, "emit_log.py") == " [x] Sent 'info: Hello World!'\n"
    # the tutorial's own line: the body is the bare text
    assert wait_for(lines, " [x] ")[-1] == ("pika receive_logs.py", " [x] b'info: Hello World!'\n")


# Tutorial 4: routing (direct)


def test_receive_logs_direct_gets_its_severities_only(run: Runner, lines: Lines) -> None:
    # Given a receiver of warnings and errors, and one of infos
    problems = run.example("receive_logs_direct.py", "warning", "error", label="warning error")
    infos = run.example("receive_logs_direct.py", "info", label="info")
    wait_for(lines, READY, count=2)
    # When a line of each severity is emitted
    assert emitted(run, "emit_log_direct.py") == " [x] Sent 'info':'Hello World!'\n"
    out = emitted(run, "emit_log_direct.py", "error", "Run.", "Run.", "Or", "it", "will", "explode.")
    assert out == " [x] Sent 'error':'Run. Run. Or it will explode.'\n"
    assert emitted(run, "emit_log_direct.py", "warning", "Low", "disk") == " [x] Sent 'warning':'Low disk'\n"
    assert emitted(run, "emit_log_direct.py", "info", "end") == " [x] Sent 'info':'end'\n"
    # Then each receiver printed the lines of its severities, in order, and no other
    # (each has one queue: a line of another severity would come before its last one)
    wait_for(lines, " [x] ", count=4)
    assert printed(problems) == [
        " [x] 'error':'Run. Run. Or it will explode.'",
        " [x] 'warning':'Low disk'",
    ]
    assert printed(infos) == [" [x] 'info':'Hello World!'", " [x] 'info':'end'"]


def test_receive_logs_direct_without_severities_prints_its_usage(run: Runner) -> None:
    code, out = run.example("receive_logs_direct.py", watch=False).finish()
    assert code == 1
    assert out.startswith("Usage: examples/receive_logs_direct.py [info] [warning] [error]"), out


def test_emit_log_direct_reaches_the_tutorials_pika_receive_logs_direct(
    real_broker_url: str, names: Names, run: Runner, lines: Lines
) -> None:
    needs_amqp(real_broker_url)
    receiver = "pika receive_logs_direct.py"
    run.pika(PIKA_RECEIVE_LOGS, names.exchange, "direct", "warning", "error", label=receiver)
    wait_for(lines, WAITING)
    emitted(run, "emit_log_direct.py", "info", "not for it")
    emitted(run, "emit_log_direct.py", "error", "Run.")
    # the first line it prints is the error: the info line was not routed to it
    assert wait_for(lines, " [x] ")[-1] == (receiver, " [x] 'error':b'Run.'\n")


# Tutorial 5: topics


def test_receive_logs_topic_gets_the_lines_its_keys_match(run: Runner, lines: Lines) -> None:
    # Given a receiver of kernel and critical lines, and one of everything
    kernel = run.example("receive_logs_topic.py", "kern.*", "*.critical", label="kern.* *.critical")
    everything = run.example("receive_logs_topic.py", "#", label="#")
    wait_for(lines, READY, count=2)
    # When lines are emitted with three routing keys
    out = emitted(run, "emit_log_topic.py", "kern.critical", "A", "critical", "kernel", "error")
    assert out == " [x] Sent 'kern.critical':'A critical kernel error'\n"
    assert emitted(run, "emit_log_topic.py") == " [x] Sent 'anonymous.info':'Hello World!'\n"
    assert emitted(run, "emit_log_topic.py", "cron.warning", "late") == " [x] Sent 'cron.warning':'late'\n"
    # Then "#" got all three, in order
    wait_for(lines, " [x] ", count=4)
    assert printed(everything) == [
        " [x] 'kern.critical':'A critical kernel error'",
        " [x] 'anonymous.info':'Hello World!'",
        " [x] 'cron.warning':'late'",
    ]
    # And the other printed the kernel line once, though both its keys match it, and
    # nothing else: its one queue would have had the other lines before a sentinel
    # line it matches
    assert emitted(run, "emit_log_topic.py", "cron.critical", "end") == " [x] Sent 'cron.critical':'end'\n"
    wait_for(lines, " [x] 'cron.critical'")
    assert printed(kernel) == [
        " [x] 'kern.critical':'A critical kernel error'",
        " [x] 'cron.critical':'end'",
    ]


def test_the_tutorials_pika_emit_log_topic_reaches_receive_logs_topic(
    real_broker_url: str, names: Names, run: Runner, lines: Lines
) -> None:
    needs_amqp(real_broker_url)
    receiver = run.example("receive_logs_topic.py", "*.critical")
    wait_for(lines, READY)
    for key in ("kern.info", "kern.critical"):
        emitter = run.pika(
            PIKA_EMIT, names.exchange, "topic", key, "disk", label="pika emit_log_topic.py", watch=False
        )
        assert emitter.finish() == (0, f" [x] Sent {key!r}:'disk'\n")
    wait_for(lines, " [x] 'kern.critical'")
    assert printed(receiver) == [" [x] 'kern.critical':'disk'"]
