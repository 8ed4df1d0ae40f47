"""Servers and proxies in their own processes, driven as a user would."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import IO, Any

import pytest
from kombu import Connection

from kombu_rpc import RPCProxy

from ..conftest import forget_leases

SERVER = textwrap.dedent("""
    import logging, sys, time
    from kombu_rpc import Registry, RPCServer
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    reg = Registry()

    @reg.remote
    def slow(seconds):
        print("started", flush=True)
        time.sleep(seconds)
        return seconds

    RPCServer(sys.argv[1], registry=reg, queue=sys.argv[2], concurrency=2).run()
    print("stopped", flush=True)
""")


def read_until(stream: IO[str], text: str, process: subprocess.Popen[str]) -> str:
    """Read lines until one contains ``text``; the test's timeout bounds the wait."""
    seen = []
    for line in stream:
        seen.append(line)
        if text in line:
            return line
    raise AssertionError(f"{text!r} never printed (exit {process.poll()}): {''.join(seen)}")


@pytest.fixture
def server_process(real_broker_url: str, queue_name: str) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(
        [sys.executable, "-c", SERVER, real_broker_url, queue_name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stderr is not None
        try:
            read_until(process.stderr, "consuming", process)
            yield process
        finally:
            if process.poll() is None:
                process.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_server_after_its_calls_in_flight(
    real_broker_url: str, queue_name: str, server_process: subprocess.Popen[str], signum: int
) -> None:
    assert server_process.stdout is not None
    with RPCProxy(real_broker_url, queue=queue_name, timeout=20) as proxy:
        # Given a call in flight
        future = proxy.slow.call_async(0.5)
        read_until(server_process.stdout, "started", server_process)
        # When the server is signalled
        server_process.send_signal(signum)
        # Then the call still gets its result, and the server exits cleanly
        assert future.result() == 0.5
    assert server_process.wait(20) == 0
    assert "stopped" in server_process.stdout.read()


PROXY = textwrap.dedent("""
    import sys
    from kombu_rpc import NoServerError, RPCProxy
    proxy = RPCProxy(sys.argv[1], queue="nobody-serves-this", timeout=5)
    try:
        proxy.fib.cast(1)  # connects and declares the reply queue
    except NoServerError:
        pass
    print(proxy.reply_queue, flush=True)
    sys.stdin.read()
""")


def test_on_amqp_the_reply_queue_dies_with_its_process(amqp_url: str) -> None:
    broker_url = amqp_url
    with (
        subprocess.Popen(
            [sys.executable, "-c", PROXY, broker_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as process,
        Connection(broker_url) as conn,
    ):
        assert process.stdout is not None
        reply_queue = process.stdout.readline().strip()
        assert reply_queue.startswith("kombu_rpc.reply.")
        assert declared(conn, reply_queue)
        process.kill()
        process.wait(10)
        deadline = time.monotonic() + 10  # the broker notices the closed socket at once
        while declared(conn, reply_queue):
            assert time.monotonic() < deadline, "reply queue outlived its process"
            time.sleep(0.05)


def declared(conn: Connection, name: str) -> bool:
    from amqp.exceptions import NotFound, ResourceLocked

    try:
        conn.channel().queue_declare(queue=name, passive=True)
    except ResourceLocked:
        return True
    except NotFound:
        return False
    return True


STUCK_SERVER = textwrap.dedent("""
    import json, logging, sys, threading
    from kombu import Connection
    from kombu_rpc import Registry, RPCServer
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    reg = Registry()

    @reg.remote
    def work(x):
        print("started", x, flush=True)
        threading.Event().wait()  # never returns: the test kills this process

    broker = Connection(sys.argv[1], transport_options=json.loads(sys.argv[3]))
    RPCServer(broker, registry=reg, queue=sys.argv[2]).run()
""")

#: On Redis an unacked message comes back once its visibility timeout has passed, at
#: the next idle poll of any consumer; by default that is an hour. The restore runs under
#: a mutex key that a connection cut while holding it (as the fault tests do) leaves
#: locked for 300 s: this test's processes use a key of their own.
REDELIVERY_OPTIONS = {"redis": {"visibility_timeout": 3, "unacked_restore_throttle": 1}}


def test_a_request_whose_server_is_killed_is_answered_once_by_another(
    real_broker_url: str, queue_name: str
) -> None:
    from kombu_rpc import Registry, RPCServer

    options = dict(REDELIVERY_OPTIONS.get(real_broker_url.split(":", 1)[0], {}))
    if options:
        options["unacked_mutex_key"] = f"test.unacked_mutex.{queue_name}"
    broker = Connection(real_broker_url, transport_options=options)
    with subprocess.Popen(
        [sys.executable, "-c", STUCK_SERVER, real_broker_url, queue_name, json.dumps(options)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as doomed:
        assert doomed.stdout is not None and doomed.stderr is not None
        try:
            read_until(doomed.stderr, "consuming", doomed)
            with RPCProxy(broker, queue=queue_name, timeout=30) as proxy:
                # Given a request that a server has started but will never finish
                future = proxy.work.call_async(7)
                read_until(doomed.stdout, "started 7", doomed)
                # When a second server joins and the first is SIGKILLed mid-request
                runs = []
                reg = Registry()
                reg.register(lambda x: runs.append(x) or ("survivor", x), name="work")
                with RPCServer(broker, registry=reg, queue=queue_name).running():
                    doomed.kill()
                    # Then the broker redelivers it, and the caller gets exactly one result
                    assert future.result() == ["survivor", 7]
                    assert runs == [7]
                    assert proxy.work(8) == ["survivor", 8]
        finally:
            if doomed.poll() is None:
                doomed.kill()


CRASHING_SERVER = textwrap.dedent("""
    import logging, os, signal, sys
    from kombu_rpc import Registry, RPCServer
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    reg = Registry()

    @reg.remote
    def crash():
        os.kill(os.getpid(), signal.SIGKILL)  # takes the whole server down, every time

    @reg.remote
    def ok():
        return "ok"

    RPCServer(sys.argv[1], registry=reg, queue=sys.argv[2], durable=True, queue_arguments={
        "x-queue-type": "quorum", "x-delivery-limit": 1,
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": sys.argv[2] + ".dead",
    }).run()
""")


def test_a_poison_request_is_dead_lettered_after_the_delivery_limit(amqp_url: str, queue_name: str) -> None:
    from kombu import Connection, Queue

    dead = Queue(f"{queue_name}.dead", routing_key=f"{queue_name}.dead")
    with Connection(amqp_url) as conn:
        channel = conn.default_channel
        dead(channel).declare()

        def dead_lettered() -> int:
            return int(channel.queue_declare(queue=dead.name, passive=True).message_count)

        try:
            with RPCProxy(amqp_url, queue=queue_name, timeout=20) as proxy:
                crashes = 0
                for _ in range(4):  # bounded: the delivery limit must end it after two crashes
                    with subprocess.Popen(
                        [sys.executable, "-c", CRASHING_SERVER, amqp_url, queue_name],
                        stderr=subprocess.PIPE,
                        text=True,
                    ) as server:
                        assert server.stderr is not None
                        if crashes == 0:
                            read_until(server.stderr, "consuming", server)
                            proxy.crash.cast()
                        # (a later server may get the redelivery, and die, before it logs anything)
                        # wait until the poison request kills this server, or is dead-lettered
                        deadline = time.monotonic() + 20
                        while server.poll() is None and not dead_lettered():
                            assert time.monotonic() < deadline, "neither a crash nor a dead letter"
                            time.sleep(0.05)
                        if server.poll() is not None:
                            crashes += 1
                            continue
                        assert proxy.ok() == "ok"  # the survivor serves on
                        server.terminate()
                        break
            assert crashes == 2  # first delivery + one redelivery (x-delivery-limit: 1)
            message = dead(channel).get(no_ack=True)
            assert message is not None and message.decode()["method"] == "crash"
        finally:
            dead(channel).delete()
            Queue(queue_name)(channel).delete()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_proxy_used_before_a_fork_works_in_each_child(
    real_broker_url: str, registry: Any, queue_name: str
) -> None:
    import multiprocessing

    from kombu_rpc import RPCServer

    fork = multiprocessing.get_context("fork")
    with (
        RPCServer(real_broker_url, registry=registry, queue=queue_name).running(),
        RPCProxy(real_broker_url, queue=queue_name, timeout=10) as proxy,
    ):
        assert proxy.echo("parent") == "parent"  # the parent's threads and reply queue exist
        results = fork.SimpleQueue()

        def child(n: int) -> None:
            results.put((n, proxy.echo(n), proxy.reply_queue))

        children = [fork.Process(target=child, args=(n,)) for n in range(2)]
        for process in children:
            process.start()
        for process in children:
            process.join(30)
            assert process.exitcode == 0
        got = sorted(results.get() for _ in children)
        # Each child got its own answer on a reply queue of its own
        assert [(n, echoed) for n, echoed, _ in got] == [(0, 0), (1, 1)]
        assert len({proxy.reply_queue, *(queue for *_, queue in got)}) == 3
        assert proxy.echo("parent again") == "parent again"
    if real_broker_url.startswith("redis"):
        # A child ends with os._exit (no atexit): on Redis its proxy's lease on its reply
        # queue stays, for a sweep an hour later; the test takes them back now
        with Connection(real_broker_url) as conn:
            client = conn.default_channel.client
            for *_, reply_queue in got:
                assert forget_leases(client, reply_queue) == 1
