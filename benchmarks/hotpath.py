"""Where the time of one sequential kombu_rpc call goes: ``python -m benchmarks.hotpath``.

Runs ``--calls`` sequential ``fib(0)`` calls through an :class:`~kombu_rpc.RPCProxy`
against a server in its own process (so the two do not share a GIL), and prints the
wall time and the CPU time per call of each client thread and of the server process
(read from ``/proc``, so no profiler distorts them).

With ``--profile DIR`` it also records both processes with py-spy during the measured
calls only (``py-spy record --idle --threads -f raw``; py-spy must be installed) and
breaks the samples down into serialization, publishing (frames, kombu's publish
machinery, waiting for the publisher confirm), draining (AMQP frame parsing, kombu
message conversion), demultiplexing (decode the reply, match its correlation id,
complete the future), the server's own steps, and waiting. The categories are matched
on kombu_rpc's, kombu's and py-amqp's function names at the time of writing; a sample
nothing matches is counted as "other".
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kombu_rpc import RPCProxy

from .baselines import PikaClient, RawKombuClient, pika_parameters
from .brokers import Broker, delete_queues, resolve_brokers, unique_queue
from .implementations import Client, KombuRPCClient
from .server_process import server_processes, wait_for_servers

#: py-spy's sampling rate, per second.
RATE = 250
_TICK = os.sysconf("SC_CLK_TCK")


def _ticks(stat_path: str) -> int:
    """utime + stime, in clock ticks, from a ``/proc/.../stat`` file."""
    with open(stat_path, encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def thread_cpu() -> dict[str, float]:
    """CPU seconds used so far by each live thread of this process, by thread name."""
    out: dict[str, float] = collections.defaultdict(float)
    for thread in threading.enumerate():
        if thread.native_id is None:
            continue
        try:
            out[thread.name] += _ticks(f"/proc/self/task/{thread.native_id}/stat") / _TICK
        except FileNotFoundError:
            pass
    return out


def process_cpu(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` (all its threads)."""
    return _ticks(f"/proc/{pid}/stat") / _TICK


@contextmanager
def _py_spy(pid: int, output: Path) -> Iterator[None]:
    """Record ``pid`` with py-spy while the block runs."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [py_spy, "record", "--idle", "--threads", "--nonblocking", "-r", str(RATE)]
    command += ["-f", "raw", "-o", str(output), "--pid", str(pid)]
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # let py-spy attach before the measured calls start
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        _, errors = recorder.communicate(timeout=60)
        if not output.exists():
            raise RuntimeError(f"py-spy wrote no profile: {errors.decode(errors='replace')[-2000:]}")


def run_calls(proxy: RPCProxy, calls: int) -> float:
    """Make ``calls`` sequential calls; returns the wall time they took."""
    started = time.perf_counter()
    for _ in range(calls):
        proxy.fib(0)
    return time.perf_counter() - started


# -- reading py-spy samples --------------------------------------------------------------

Rule = tuple[str, Callable[[list[str]], bool]]


def _any(*names: str) -> Callable[[list[str]], bool]:
    return lambda frames: any(frame in names for frame in frames)


def _all(*tests: Callable[[list[str]], bool]) -> Callable[[list[str]], bool]:
    return lambda frames: all(test(frames) for test in tests)


def _leaf(*names: str) -> Callable[[list[str]], bool]:
    return lambda frames: bool(frames) and frames[-1] in names


def _always(frames: list[str]) -> bool:
    return True


#: Categories per thread (first match wins). "idle:" marks waiting, not working.
RULES: dict[str, list[Rule]] = {
    "caller (MainThread)": [
        ("idle: wait for the reply (Future.result)", _any("Future.result")),
        ("idle: wait for a reply or confirm (select)", _leaf("AmqpLink.read")),
        ("demux: decode reply, match id, complete future", _any("Client._on_reply")),
        ("read: confirms", _any("AmqpLink._on_ack")),
        ("read: AMQP frames, kombu message conversion", _any("Connection.drain_events")),
        ("publish: socket write", _all(_any("AmqpLink._publish"), _leaf("_AbstractTransport.write"))),
        ("publish: AMQP frames, kombu Producer.publish", _any("AmqpLink._publish")),
        ("serialize the request (kombu dumps, JSON)", _any("encode", "dumps")),
        ("build the request (uuid4, headers, deadline)", _any("Client._request", "new_id", "uuid4")),
        ("pending-call bookkeeping (future, deadline heap)", _any("PendingCalls.add")),
        ("leader/follower bookkeeping", _any("Turns.wait")),
        ("queue for the publisher thread (Redis)", _any("Client.call", "Client._start")),
        ("proxy layer (MethodProxy, name check)", _always),
    ],
    "kombu_rpc-publisher": [  # Redis
        ("idle: wait for the next request", _leaf("PollingLink._publish_loop")),
        (
            "idle: wait for the publisher confirm",
            _all(_any("Channel.basic_publish_confirm"), _any("AbstractChannel.wait")),
        ),
        ("publish: socket write", _leaf("_AbstractTransport.write")),
        ("publish: build AMQP frames", _any("Channel._basic_publish")),
        ("publish: kombu Producer.publish machinery", _any("Producer.publish")),
        ("publisher other", _always),
    ],
    "kombu_rpc-replies": [
        ("idle: wait for a frame (socket read)", _leaf("TCPTransport._read", "SSLTransport._read")),
        ("demux: decode reply, match id, complete future", _any("Client._on_reply")),
        ("drain: kombu message conversion", _any("Consumer._receive_callback", "Channel.message_to_python")),
        ("drain: AMQP frame parsing", _any("Connection.drain_events")),
        ("listener other", _always),
    ],
    "server": [
        ("idle: wait for a frame (socket read)", _leaf("TCPTransport._read", "SSLTransport._read")),
        (
            "publish the reply: socket write",
            _all(_any("ReplyPublisher.publish_reply"), _leaf("_AbstractTransport.write")),
        ),
        ("publish the reply: frames, kombu", _any("ReplyPublisher.publish_reply")),
        ("ack the request (on its reply's confirm)", _any("Message.ack", "ReplyPublisher.settle")),
        ("run the function, build the result body", _any("Dispatcher.run")),
        ("decode + validate the request", _any("ConsumeLoop._on_request")),
        ("drain: frame parsing, message conversion", _any("Connection.drain_events")),
        ("server loop other", _always),
    ],
}


def read_samples(path: Path) -> Iterator[tuple[str, list[str], int]]:
    """(thread name, function names root first, count) for each line of a raw py-spy file."""
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        _, _, frames = stack.partition(": ")
        thread, *rest = frames.split(";")
        yield thread, [re.sub(r" \(.*\)$", "", frame) for frame in rest], int(count)


def breakdown(path: Path, role: str, calls: int) -> dict[str, collections.Counter[str]]:
    """Samples per category for each thread of a profile ("client" or "server")."""
    out: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for thread, frames, count in read_samples(path):
        if role == "server":
            if thread != "MainThread":
                continue
            key = "server"
        elif thread == "MainThread":
            if "run_calls" not in frames:
                continue
            key = "caller (MainThread)"
        elif thread in RULES:
            key = thread
        else:
            continue
        for label, test in RULES[key]:
            if test(frames):
                out[key][label] += count
                break
    return out


def print_breakdown(groups: dict[str, collections.Counter[str]], calls: int) -> None:
    """Print each thread's categories in microseconds per call."""
    for thread, counter in groups.items():
        total = sum(counter.values())
        print(f"  {thread}: {total / RATE / calls * 1e6:,.0f} us/call sampled")
        for label, count in counter.most_common():
            print(f"    {count / RATE / calls * 1e6:7,.0f} us  {100 * count / total:5.1f}%  {label}")


def compare_clients(broker: Broker, queue: str, proxy: RPCProxy, calls: int, rounds: int) -> None:
    """Time kombu_rpc's proxy, the raw-kombu client and (AMQP) the pika tutorial client
    against the same kombu_rpc server process, in alternating rounds; print medians of
    wall and client-process CPU per call. The server is the same for all three, so the
    differences are the clients'."""
    clients: dict[str, Client] = {
        "kombu_rpc": KombuRPCClient(proxy, 30.0),
        "raw_kombu": RawKombuClient(broker.url, queue, {}, 30.0),
    }
    if broker.name == "amqp":
        clients["pika"] = PikaClient(pika_parameters(broker.url), queue, 30.0)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
    try:
        for client in clients.values():
            for _ in range(200):
                client.call("fib", 0)
        names = list(clients)
        for round_no in range(rounds):
            for name in names if round_no % 2 == 0 else names[::-1]:
                client = clients[name]
                cpu, started = time.process_time(), time.perf_counter()
                for _ in range(calls):
                    client.call("fib", 0)
                wall = time.perf_counter() - started
                samples[name].append((wall / calls, (time.process_time() - cpu) / calls))
    finally:
        for name, client in clients.items():
            if name != "kombu_rpc":
                client.close()
    print(f"clients against the same server process, medians of {rounds} rounds of {calls:,} calls:")
    for name, values in samples.items():
        wall = statistics.median(w for w, _ in values)
        cpu = statistics.median(c for _, c in values)
        print(
            f"  {name:<10} {1 / wall:7,.0f} calls/s  wall {wall * 1e6:6,.0f} us/call  "
            f"client CPU {cpu * 1e6:5,.0f} us/call"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the hot-path measurement (and profile); see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hotpath", description=__doc__.split("\n")[0])
    parser.add_argument("--broker", default="amqp", help="broker name or URL (default: amqp)")
    parser.add_argument("--calls", type=int, default=5000, help="measured calls (default 5,000)")
    parser.add_argument("--no-confirm", action="store_true", help="confirm_publish=False on both sides")
    parser.add_argument("--profile", metavar="DIR", help="record client and server with py-spy into DIR")
    parser.add_argument(
        "--compare-clients",
        type=int,
        metavar="ROUNDS",
        default=0,
        help="also time the raw-kombu and pika clients against the same server, in ROUNDS rounds",
    )
    args = parser.parse_args(argv)
    (broker,) = resolve_brokers(args.broker)
    if broker.in_process:
        parser.error("the server runs in another process: use amqp or redis")
    if args.no_confirm and broker.name != "amqp":
        parser.error("--no-confirm: publisher confirms are an AMQP feature")
    confirm = not args.no_confirm
    profiles = Path(args.profile) if args.profile else None
    n = args.calls
    queue = unique_queue()
    try:
        with (
            server_processes(broker, queue, 1, "kombu_rpc" if confirm else "kombu_rpc_noconfirm") as (
                server,
            ),
            RPCProxy(broker.url, queue=queue, timeout=30, confirm_publish=confirm) as proxy,
        ):
            wait_for_servers(proxy, [server], timeout=60)
            run_calls(proxy, 500)  # warm-up
            with _profiling(profiles, server.pid):
                cpu_before, server_before = thread_cpu(), process_cpu(server.pid)
                wall = run_calls(proxy, n)
                cpu_after, server_after = thread_cpu(), process_cpu(server.pid)
            print(
                f"{n:,} sequential calls on {broker.name}, confirm_publish={confirm}: {n / wall:,.0f} calls/s"
            )
            print(f"  wall {wall / n * 1e6:,.0f} us/call")
            for name in sorted(cpu_after):
                used = cpu_after[name] - cpu_before.get(name, 0.0)
                print(f"  CPU {name}: {used / n * 1e6:,.0f} us/call")
            client_cpu = sum(cpu_after.values()) - sum(cpu_before.values())
            print(f"  CPU client total: {client_cpu / n * 1e6:,.0f} us/call")
            print(f"  CPU server process: {(server_after - server_before) / n * 1e6:,.0f} us/call")
            if profiles is not None:
                print(f"py-spy samples at {RATE}/s (idle included), per call:")
                print_breakdown(breakdown(profiles / "client.txt", "client", n), n)
                print_breakdown(breakdown(profiles / "server.txt", "server", n), n)
            if args.compare_clients:
                compare_clients(broker, queue, proxy, n, args.compare_clients)
    finally:
        delete_queues(broker, [queue])
    return 0


@contextmanager
def _profiling(profiles: Path | None, server_pid: int) -> Iterator[None]:
    """py-spy on this process and the server while the block runs, if ``profiles``."""
    if profiles is None:
        yield
        return
    profiles.mkdir(parents=True, exist_ok=True)
    with _py_spy(os.getpid(), profiles / "client.txt"), _py_spy(server_pid, profiles / "server.txt"):
        yield


if __name__ == "__main__":
    raise SystemExit(main())
