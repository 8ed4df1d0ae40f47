"""Behaviour of calls, run on memory:// and on every real broker."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from time import monotonic
from typing import Any

import pytest
from amqp.exceptions import ResourceLocked
from kombu import Connection

from kombu_rpc import (
    CallError,
    ConfigurationError,
    InvalidArguments,
    MethodNotFound,
    Registry,
    RemoteError,
    RPCError,
    RPCProxy,
    RPCServer,
    RPCTimeout,
    SerializationError,
)

from ..conftest import Gate, Recorder


def test_a_call_returns_the_remote_result(serve: Callable[..., RPCServer], proxy: RPCProxy) -> None:
    serve()
    assert proxy.fib(30) == 832040
    assert proxy.echo({"a": [1, 2.5, None, "é"]}) == {"a": [1, 2.5, None, "é"]}


def test_dotted_names_by_attribute_chain_and_by_item(
    serve: Callable[..., RPCServer], proxy: RPCProxy
) -> None:
    serve()
    assert proxy.math.add(1, 2) == 3
    assert proxy["math.add"](1, 2) == 3


def test_keyword_arguments_travel(serve: Callable[..., RPCServer], proxy: RPCProxy) -> None:
    serve()
    assert proxy.math.add(a="x", b="y") == "xy"
    assert proxy.math.add("x", b="z") == "xz"


def test_a_remote_exception_reaches_the_caller(serve: Callable[..., RPCServer], proxy: RPCProxy) -> None:
    serve()
    with pytest.raises(RemoteError) as info:
        proxy.boom("bad n")
    error = info.value
    assert type(error) is RemoteError
    assert (error.exc_type, error.exc_message) == ("ValueError", "bad n")
    assert str(error) == "ValueError: bad n"
    assert "Traceback" in error.remote_traceback and "in boom" in error.remote_traceback


def test_a_remote_failure_is_logged_at_error_with_its_traceback_unless_expected(
    serve: Callable[..., RPCServer], proxy: RPCProxy, log_waiter: Callable[[str], Any]
) -> None:
    reg = Registry()

    @reg.remote
    def crash(n: int) -> None:
        raise ValueError(f"crash {n}")

    @reg.remote(expected=KeyError)
    def find(key: str) -> None:
        raise KeyError(key)

    serve(registry=reg)
    crashed, missing = log_waiter("crash failed"), log_waiter("find raised KeyError")
    with pytest.raises(RemoteError, match="crash 1"):
        proxy.crash(1)
    with pytest.raises(RemoteError, match="KeyError"):
        proxy.find("nope")
    assert crashed.seen.wait(10) and missing.seen.wait(10)
    [error] = crashed.records
    assert error.levelno == logging.ERROR and error.exc_info is not None
    assert isinstance(error.exc_info[1], ValueError)
    [expected] = missing.records
    assert expected.levelno == logging.INFO and expected.exc_info is None
    assert "'nope'" in expected.getMessage()


def test_tracebacks_can_be_withheld(serve: Callable[..., RPCServer], proxy: RPCProxy) -> None:
    serve(send_tracebacks=False)
    with pytest.raises(RemoteError) as info:
        proxy.boom()
    assert info.value.remote_traceback == ""


def test_an_unknown_method_raises_method_not_found(serve: Callable[..., RPCServer], proxy: RPCProxy) -> None:
    serve()
    with pytest.raises(MethodNotFound) as info:
        proxy.no.such.thing()
    assert isinstance(info.value, RemoteError)
    assert "no.such.thing" in str(info.value)


def test_wrong_arguments_are_refused_without_running_the_function(
    serve: Callable[..., RPCServer], proxy: RPCProxy, recorder: Recorder
) -> None:
    serve()
    for args, kwargs in [((), {}), ((1, 2), {}), ((), {"nope": 1}), ((1,), {"value": 1})]:
        with pytest.raises(RemoteError) as info:
            proxy.record(*args, **kwargs)
        assert isinstance(info.value, InvalidArguments)
        assert info.value.exc_type == "TypeError"
    proxy.record("ok")
    assert recorder.calls == ["ok"]


def test_an_unserializable_result_is_an_error_and_the_server_goes_on(
    serve: Callable[..., RPCServer], proxy: RPCProxy
) -> None:
    serve()
    with pytest.raises(RemoteError) as info:
        proxy.unserializable()
    assert info.value.exc_type == "UnserializableResult"
    assert "not JSON serializable" in info.value.exc_message
    assert proxy.fib(10) == 55


def test_unencodable_arguments_fail_locally(serve: Callable[..., RPCServer], proxy: RPCProxy) -> None:
    serve()
    with pytest.raises(SerializationError):
        proxy.echo(object())
    assert proxy.echo(1) == 1


def test_a_call_times_out_and_its_late_reply_is_dropped(
    serve: Callable[..., RPCServer], proxy: RPCProxy, gate: Gate, recorder: Recorder, log_waiter: Any
) -> None:
    serve()
    dropped = log_waiter("dropped a late or duplicate reply")
    # When the function outlives the caller's timeout
    with pytest.raises(RPCTimeout) as info:
        proxy.options(timeout=0.3).held("late")
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, RPCError)
    assert info.value.method == "held" and info.value.timeout == 0.3
    # Then, once it finishes, its reply arrives and is dropped
    gate.released.set()
    assert recorder.wait(1) == ["late"]
    assert dropped.seen.wait(10)
    # And the next call gets its own result, not the late one
    assert proxy.echo("next") == "next"


def test_a_future_fails_at_its_deadline_even_if_nobody_waits(
    serve: Callable[..., RPCServer], proxy: RPCProxy
) -> None:
    serve()
    done = threading.Event()
    future = proxy.options(timeout=0.2).held.call_async()
    future.add_done_callback(lambda f: done.set())
    assert done.wait(10)
    assert isinstance(future.exception(), RPCTimeout)


@pytest.mark.parametrize("timeout", [0.2, 0.5, 1.2])
def test_a_blocking_call_times_out_within_50ms_of_its_deadline(
    serve: Callable[..., RPCServer], proxy: RPCProxy, timeout: float
) -> None:
    serve()
    assert proxy.echo("warm") == "warm"
    lateness = []
    for _ in range(3):
        began = monotonic()
        with pytest.raises(RPCTimeout):
            proxy.options(timeout=timeout).held()
        lateness.append(monotonic() - began - timeout)
    # each measured from before the call, so a little more than the call's own lateness
    assert all(0 <= late < 0.05 for late in lateness), lateness


def test_requests_past_their_deadline_are_never_run(
    broker_url: str,
    registry: Any,
    serve: Callable[..., RPCServer],
    proxy: RPCProxy,
    recorder: Recorder,
    queue_name: str,
) -> None:
    # Given a request queue with no server consuming it
    with RPCServer(broker_url, registry=registry, queue=queue_name).running():
        pass  # declares the queue on every broker
    # When calls wait there past their deadline
    futures = [proxy.options(timeout=0.2).record.call_async(i) for i in range(3)]
    for future in futures:
        with pytest.raises(RPCTimeout):
            future.result(timeout=10)
    # Then a server started later drops them unrun, and serves new calls
    serve()
    proxy.record("fresh")
    assert recorder.calls == ["fresh"]


def test_twenty_threads_share_one_proxy_without_crossed_replies(
    serve: Callable[..., RPCServer], proxy: RPCProxy
) -> None:
    serve(concurrency=4)

    def worker(thread: int) -> list[tuple[Any, Any]]:
        return [(proxy.echo([thread, i]), [thread, i]) for i in range(50)]

    with ThreadPoolExecutor(20) as pool:
        outcomes = [pair for chunk in pool.map(worker, range(20)) for pair in chunk]
    assert len(outcomes) == 1000
    assert all(got == expected for got, expected in outcomes)


def test_two_hundred_futures_in_flight(serve: Callable[..., RPCServer], proxy: RPCProxy) -> None:
    serve(concurrency=2)
    futures = [proxy.math.add.call_async(i, 1000) for i in range(200)]
    assert [f.result(timeout=30) for f in futures] == [i + 1000 for i in range(200)]


def test_a_cast_runs_without_a_reply(
    serve: Callable[..., RPCServer], proxy: RPCProxy, recorder: Recorder
) -> None:
    serve()
    assert proxy.record.cast("a") is None
    proxy.boom.cast("errors of casts are only logged")
    proxy.record.cast("b")
    assert recorder.wait(2) == ["a", "b"]
    assert proxy.echo(1) == 1


def test_two_servers_share_one_queue(
    serve: Callable[..., RPCServer], proxies: Callable[..., RPCProxy], queue_name: str
) -> None:
    # Given two single-slot servers on one queue, and a function that returns only
    # once two calls run at the same time
    from kombu_rpc import Registry

    barrier = threading.Barrier(2, timeout=10)
    for tag in ("A", "B"):
        reg = Registry()
        reg.register(lambda tag=tag: (barrier.wait(), tag)[1], name="meet")
        serve(registry=reg)
    proxy = proxies()
    # When two calls are made at once, then each server answers one
    futures = [proxy.meet.call_async() for _ in range(2)]
    assert sorted(f.result(timeout=20) for f in futures) == ["A", "B"]


def test_graceful_stop_finishes_calls_in_flight(
    broker_url: str, registry: Any, queue_name: str, proxy: RPCProxy, gate: Gate
) -> None:
    server = RPCServer(broker_url, registry=registry, queue=queue_name, concurrency=2)
    with server.running():
        futures = [proxy.held.call_async(i) for i in range(2)]
        gate.wait_entered(2)
        server.stop()  # returns at once; the with block joins the server
        gate.released.set()
    assert [f.result(timeout=10) for f in futures] == [0, 1]
    assert not server.ready


def test_a_server_can_be_restarted_but_not_run_twice_at_once(
    broker_url: str, registry: Any, queue_name: str, proxy: RPCProxy
) -> None:
    server = RPCServer(broker_url, registry=registry, queue=queue_name)
    with server.running():
        assert proxy.fib(5) == 5
        with pytest.raises(ConfigurationError, match="already running"), server.running():
            pass
    with server.running():
        assert proxy.fib(6) == 8


def queue_exists(broker_url: str, name: str) -> bool:
    with Connection(broker_url) as conn:
        try:
            conn.default_channel.queue_declare(queue=name, passive=True)
        except ResourceLocked:  # AMQP: exclusive to another connection, so it exists
            return True
        except conn.channel_errors:
            return False
        return True


def test_the_reply_queue_is_gone_after_close(
    broker_url: str, serve: Callable[..., RPCServer], queue_name: str
) -> None:
    serve()
    proxy = RPCProxy(broker_url, queue=queue_name)
    assert proxy.fib(1) == 1
    if not broker_url.startswith("redis"):  # on Redis an empty queue is no key at all
        assert queue_exists(broker_url, proxy.reply_queue)
    proxy.close()
    assert not queue_exists(broker_url, proxy.reply_queue)
    with pytest.raises(CallError):
        proxy.fib(1)


def test_calls_pending_at_close_fail(serve: Callable[..., RPCServer], proxy: RPCProxy, gate: Gate) -> None:
    serve()
    future = proxy.held.call_async()
    gate.wait_entered()
    proxy.close()
    with pytest.raises(CallError, match="closed"):
        future.result(timeout=10)


def test_options_views_share_the_reply_queue(serve: Callable[..., RPCServer], proxy: RPCProxy) -> None:
    serve()
    view = proxy.options(timeout=5)
    assert view.reply_queue == proxy.reply_queue and view.timeout == 5.0
    assert proxy.options(timeout=None).timeout is None
    assert view.fib(7) == 13
    view.close()  # a view does not close its proxy
    assert proxy.fib(7) == 13
    with pytest.raises(ConfigurationError):
        proxy.options(timeout=0)


def test_idle_proxy_and_server_use_almost_no_cpu(serve: Callable[..., RPCServer], proxy: RPCProxy) -> None:
    serve(concurrency=2)
    assert proxy.fib(3) == 2
    cpu = time.process_time()
    threading.Event().wait(1.0)  # an idle second, not a synchronisation
    busy = time.process_time() - cpu
    assert busy < 0.25, f"idle proxy + server used {busy:.2f}s of CPU in 1s"


def test_async_def_functions_run_on_the_servers_event_loop(
    broker_url: str, queue_name: str, servers: Any, proxies: Callable[..., RPCProxy]
) -> None:
    import asyncio

    from kombu_rpc import Registry

    reg = Registry()

    @reg.remote
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    @reg.remote
    async def fail() -> None:
        raise KeyError("gone")

    servers.enter_context(RPCServer(broker_url, registry=reg, queue=queue_name, concurrency=3).running())
    proxy = proxies()
    assert [f.result(timeout=10) for f in [proxy.double.call_async(i) for i in range(20)]] == [
        2 * i for i in range(20)
    ]
    with pytest.raises(RemoteError) as info:
        proxy.fail()
    assert info.value.exc_type == "KeyError"


def test_every_server_answers_ping_and_describe(serve: Callable[..., RPCServer], proxy: RPCProxy) -> None:
    server = serve()
    assert proxy.kombu_rpc.ping() == {
        "server_id": server.server_id,
        "queue": server.queue,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }
    methods = {m["name"]: m for m in proxy["kombu_rpc.describe"]()}
    assert {"fib", "math.add", "kombu_rpc.ping", "kombu_rpc.describe"} <= set(methods)
    assert methods["fib"]["signature"] == "(n: int) -> int"
    assert methods["kombu_rpc.ping"]["doc"] == "Identify this server."


def test_no_server_fails_fast_on_amqp_and_times_out_elsewhere(
    broker_url: str, proxies: Callable[..., RPCProxy]
) -> None:
    from kombu_rpc import NoServerError

    proxy = proxies(timeout=0.5)  # on the test's queue, which no server declared
    if broker_url.startswith("amqp"):
        # the broker returns the mandatory request at once: no wait for the timeout
        with pytest.raises(NoServerError, match="is a server running"):
            proxy.fib(1)
        with pytest.raises(NoServerError):
            proxy.fib.cast(1)
        # without confirms nothing tells the caller, so the call times out
        with pytest.raises(RPCTimeout):
            proxies(timeout=0.5, confirm_publish=False).fib(1)
    else:
        with pytest.raises(RPCTimeout):
            proxy.fib(1)


@pytest.mark.parametrize("confirm", [True, False], ids=["confirms", "no-confirms"])
def test_calls_work_with_and_without_publisher_confirms(
    serve: Callable[..., RPCServer], proxies: Callable[..., RPCProxy], confirm: bool
) -> None:
    serve(confirm_publish=confirm, concurrency=2)
    proxy = proxies(confirm_publish=confirm)
    assert [f.result(timeout=10) for f in [proxy.fib.call_async(i) for i in range(50)]] == [
        proxy.fib(i) for i in range(50)
    ]
