"""Behaviour of AsyncRPCProxy, run on memory:// and on every real broker.

Each test drives its coroutines with a plain ``asyncio.run`` (in debug mode, which
also raises on loop methods called from a foreign thread).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import pytest
from amqp.exceptions import ResourceLocked
from kombu import Connection

from kombu_rpc import (
    AsyncRPCProxy,
    CallError,
    ConfigurationError,
    ConnectionLostError,
    MethodNotFound,
    RemoteError,
    RPCError,
    RPCServer,
    RPCTimeout,
    SerializationError,
)
from kombu_rpc import _client as client_module
from kombu_rpc._client import Client

from ..conftest import Gate, Recorder

T = TypeVar("T")
Serve = Callable[..., RPCServer]
MakeProxy = Callable[..., AsyncRPCProxy]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro, debug=True)


@pytest.fixture
def aproxies(broker_url: str, queue_name: str) -> Iterator[MakeProxy]:
    """Make async proxies for the test's broker and queue; all are closed at the end."""
    made: list[AsyncRPCProxy] = []

    def make(**kwargs: Any) -> AsyncRPCProxy:
        kwargs.setdefault("queue", queue_name)
        kwargs.setdefault("timeout", 10.0)
        made.append(AsyncRPCProxy(broker_url, **kwargs))
        return made[-1]

    yield make

    async def close_all() -> None:
        for proxy in made:
            await proxy.aclose()

    run(close_all())


def test_an_awaited_call_returns_the_remote_result(serve: Serve, aproxies: MakeProxy) -> None:
    serve()

    async def main() -> None:
        async with aproxies() as proxy:
            assert await proxy.fib(30) == 832040
            assert await proxy.echo({"a": [1, 2.5, None, "é"]}) == {"a": [1, 2.5, None, "é"]}

    run(main())


def test_dotted_names_by_attribute_chain_and_by_item(serve: Serve, aproxies: MakeProxy) -> None:
    serve()

    async def main() -> None:
        async with aproxies() as proxy:
            assert await proxy.math.add(1, 2) == 3
            assert await proxy["math.add"](1, 2) == 3
            assert repr(proxy.math.add) == f"<AsyncMethodProxy 'math.add' on {proxy.queue!r}>"

    run(main())


def test_keyword_arguments_travel(serve: Serve, aproxies: MakeProxy) -> None:
    serve()

    async def main() -> None:
        async with aproxies() as proxy:
            assert await proxy.math.add(a="x", b="y") == "xy"
            assert await proxy.math.add("x", b="z") == "xz"

    run(main())


def test_a_remote_exception_reaches_the_caller(serve: Serve, aproxies: MakeProxy) -> None:
    serve()

    async def main() -> RemoteError:
        async with aproxies() as proxy:
            with pytest.raises(RemoteError) as info:
                await proxy.boom("bad n")
            return info.value

    error = run(main())
    assert type(error) is RemoteError
    assert (error.exc_type, error.exc_message) == ("ValueError", "bad n")
    assert str(error) == "ValueError: bad n"
    assert "Traceback" in error.remote_traceback and "in boom" in error.remote_traceback


def test_an_unknown_method_raises_method_not_found(serve: Serve, aproxies: MakeProxy) -> None:
    serve()

    async def main() -> None:
        async with aproxies() as proxy:
            with pytest.raises(MethodNotFound, match=r"no\.such\.thing"):
                await proxy.no.such.thing()
            assert await proxy.fib(10) == 55

    run(main())


def test_errors_found_before_sending_are_raised_by_the_call(serve: Serve, aproxies: MakeProxy) -> None:
    serve()

    async def main() -> None:
        async with aproxies() as proxy:
            with pytest.raises(ConfigurationError, match="invalid remote name"):
                await proxy["bad name"]()
            with pytest.raises(ConfigurationError, match="invalid remote name"):
                await proxy["bad name"].call_async()
            with pytest.raises(SerializationError):
                await proxy.echo(object())
            with pytest.raises(SerializationError):
                await proxy.record.cast(object())
            with pytest.raises(AttributeError):
                proxy._private  # noqa: B018
            with pytest.raises(AttributeError):
                proxy.fib._private  # noqa: B018
            assert await proxy.echo(1) == 1

    run(main())


def test_a_call_times_out_while_the_loop_and_the_proxy_go_on(
    serve: Serve, aproxies: MakeProxy, gate: Gate, recorder: Recorder, log_waiter: Any
) -> None:
    serve(concurrency=2)
    dropped = log_waiter("dropped a late or duplicate reply")

    async def main() -> tuple[RPCTimeout, int]:
        async with aproxies() as proxy:
            assert await proxy.echo("warm") == "warm"  # connected
            # When a call outlives its timeout
            late = asyncio.ensure_future(proxy.options(timeout=0.3).held("late"))
            # Then other calls on the same proxy are answered while it waits, one after
            # another (were the loop blocked by the waiting call, at most the first one)
            answered_while_waiting = 0
            while not late.done():
                assert await proxy.echo("tick") == "tick"
                if not late.done():
                    answered_while_waiting += 1
            with pytest.raises(RPCTimeout) as info:
                await late
            # And once the function finishes, its late reply is dropped
            gate.released.set()
            assert await asyncio.to_thread(recorder.wait, 1) == ["late"]
            assert await asyncio.to_thread(dropped.seen.wait, 10)
            assert await proxy.echo("next") == "next"
            return info.value, answered_while_waiting

    error, answered = run(main())
    assert isinstance(error, TimeoutError) and isinstance(error, RPCError)
    assert error.method == "held" and error.timeout == 0.3
    assert answered >= 2, f"only {answered} calls were answered while a call waited for its timeout"


def test_a_waiting_call_does_not_hold_up_the_others(serve: Serve, aproxies: MakeProxy, gate: Gate) -> None:
    serve(concurrency=2)

    async def main() -> None:
        async with aproxies() as proxy:
            slow = asyncio.ensure_future(proxy.held("slow"))
            await asyncio.to_thread(gate.wait_entered)
            assert await proxy.echo("meanwhile") == "meanwhile"
            assert not slow.done()  # it can only end when the gate opens (or in 10 s)
            gate.released.set()
            assert await slow == "slow"

    run(main())


def test_call_async_returns_an_asyncio_future(serve: Serve, aproxies: MakeProxy) -> None:
    serve(concurrency=2)

    async def main() -> None:
        async with aproxies() as proxy:
            future = await proxy.fib.call_async(30)
            assert isinstance(future, asyncio.Future)
            assert await future == 832040
            futures = [await proxy.math.add.call_async(i, 1000) for i in range(50)]
            assert [await f for f in futures] == [i + 1000 for i in range(50)]
            failing = await proxy.boom.call_async("bad")
            with pytest.raises(RemoteError, match="ValueError: bad"):
                await failing

    run(main())


def test_a_future_fails_at_its_deadline_even_if_nobody_awaits_it(serve: Serve, aproxies: MakeProxy) -> None:
    serve()

    async def main() -> BaseException | None:
        async with aproxies() as proxy:
            future = await proxy.options(timeout=0.2).held.call_async()
            done = asyncio.Event()
            future.add_done_callback(lambda f: done.set())
            await done.wait()
            return future.exception()

    assert isinstance(run(main()), RPCTimeout)


def test_a_cast_runs_without_a_reply(serve: Serve, aproxies: MakeProxy, recorder: Recorder) -> None:
    serve()

    async def main() -> None:
        async with aproxies() as proxy:
            assert await proxy.record.cast("a") is None  # type: ignore[func-returns-value]
            await proxy.boom.cast("errors of casts are only logged")
            await proxy.record.cast("b")
            assert await asyncio.to_thread(recorder.wait, 2) == ["a", "b"]
            assert await proxy.echo(1) == 1

    run(main())


def test_options_views_share_the_reply_queue(serve: Serve, aproxies: MakeProxy) -> None:
    serve()

    async def main() -> None:
        async with aproxies() as proxy:
            view = proxy.options(timeout=5)
            assert isinstance(view, AsyncRPCProxy)
            assert view.reply_queue == proxy.reply_queue and view.queue == proxy.queue
            assert view.timeout == 5.0 and proxy.timeout == 10.0
            assert proxy.options(timeout=None).timeout is None
            assert proxy.options().timeout == 10.0
            assert view.options(timeout=2).reply_queue == proxy.reply_queue
            assert await view.fib(7) == 13
            await view.aclose()  # a view does not close its proxy
            assert await proxy.fib(7) == 13
            with pytest.raises(ConfigurationError):
                proxy.options(timeout=0)
        with pytest.raises(CallError, match="closed"):  # but closing the proxy closes its views
            await view.fib(7)

    run(main())


def test_two_thousand_concurrent_awaits_on_one_proxy(serve: Serve, aproxies: MakeProxy) -> None:
    serve(concurrency=4)

    async def main() -> list[Any]:
        async with aproxies(timeout=30) as proxy:
            return await asyncio.gather(*(proxy.echo(["n", i]) for i in range(2000)))

    assert run(main()) == [["n", i] for i in range(2000)]


def queue_exists(broker_url: str, name: str) -> bool:
    with Connection(broker_url) as conn:
        try:
            conn.default_channel.queue_declare(queue=name, passive=True)
        except ResourceLocked:  # AMQP: exclusive to another connection, so it exists
            return True
        except conn.channel_errors:
            return False
        return True


def queue_lasts(broker_url: str, name: str) -> bool:
    """Whether queue ``name`` exists and does not expire by itself (as a Redis list with
    a time to live does)."""
    if broker_url.startswith("redis"):
        with Connection(broker_url) as conn:
            return bool(conn.default_channel.client.pttl(name) == -1)
    return queue_exists(broker_url, name)


def test_aclose_deletes_the_reply_queue_and_ends_every_call(
    broker_url: str, serve: Serve, aproxies: MakeProxy, gate: Gate
) -> None:
    serve()
    proxy = aproxies()

    async def main() -> None:
        assert await proxy.fib(1) == 1
        if not broker_url.startswith("redis"):  # on Redis an empty queue is no key at all
            assert await asyncio.to_thread(queue_exists, broker_url, proxy.reply_queue)
        pending = await proxy.held.call_async()
        await asyncio.to_thread(gate.wait_entered)
        await proxy.aclose()
        with pytest.raises(CallError, match="closed before the reply arrived"):
            await pending
        with pytest.raises(CallError, match="the proxy is closed"):
            await proxy.fib(1)
        with pytest.raises(CallError, match="the proxy is closed"):
            await proxy.record.cast(1)
        await proxy.aclose()  # closing twice is harmless
        # gone, or on Redis (where the held call's reply would make it again) left to
        # expire by itself (tests/integration/test_leftovers.py)
        assert not await asyncio.to_thread(queue_lasts, broker_url, proxy.reply_queue)

    run(main())


def test_requests_made_before_aclose_are_still_sent(
    serve: Serve, aproxies: MakeProxy, recorder: Recorder
) -> None:
    serve()

    async def main() -> None:
        proxy = aproxies()
        # gather starts its tasks in order: three casts, then the close
        await asyncio.gather(*(proxy.record.cast(i) for i in range(3)), proxy.aclose())
        assert sorted(await asyncio.to_thread(recorder.wait, 3)) == [0, 1, 2]

    run(main())


def test_a_cancelled_call_leaves_the_proxy_usable(
    serve: Serve, aproxies: MakeProxy, gate: Gate, recorder: Recorder
) -> None:
    serve()

    async def main() -> None:
        async with aproxies() as proxy:
            call = asyncio.ensure_future(proxy.held("abandoned"))
            await asyncio.to_thread(gate.wait_entered)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            gate.released.set()
            assert await asyncio.to_thread(recorder.wait, 1) == ["abandoned"]
            assert await proxy.echo("after") == "after"

    run(main())


def test_a_call_cancelled_before_its_request_is_sent_is_never_sent(
    serve: Serve, aproxies: MakeProxy, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve()
    entered, release = threading.Event(), threading.Event()
    original = Client.cast

    def cast(self: Client, queue: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args == ("first",):  # hold the proxy's worker thread
            entered.set()
            assert release.wait(20)
        original(self, queue, method, args, kwargs)

    monkeypatch.setattr(Client, "cast", cast)

    async def main() -> None:
        async with aproxies() as proxy:
            first = asyncio.ensure_future(proxy.record.cast("first"))
            assert await asyncio.to_thread(entered.wait, 10)
            second = asyncio.ensure_future(proxy.record.cast("second"))
            await asyncio.sleep(0)  # one loop turn: the task queues its request behind "first"
            second.cancel()
            with pytest.raises(asyncio.CancelledError):
                await second
            release.set()
            await first
            await proxy.record.cast("third")
            # one server thread runs the requests in order: "second" would come before "third"
            assert await asyncio.to_thread(recorder.wait, 2) == ["first", "third"]

    run(main())


def test_one_proxy_serves_several_event_loops(serve: Serve, aproxies: MakeProxy) -> None:
    serve()
    proxy = aproxies()  # made outside any event loop
    assert run(proxy.fib(10)) == 55
    assert run(proxy.fib(11)) == 89


def test_blocking_steps_never_run_on_the_event_loop_thread(
    serve: Serve, aproxies: MakeProxy, gate: Gate, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve(concurrency=2)
    # Record the threads that run the client's blocking methods (they take its lock and
    # do network I/O; the first call also connects) ...
    threads: dict[str, set[int]] = {"call": set(), "cast": set(), "close": set(), "wait": set()}

    def spy(name: str) -> Callable[..., Any]:
        original = getattr(Client, name)

        def spied(*args: Any, **kwargs: Any) -> Any:
            threads[name].add(threading.get_ident())
            return original(*args, **kwargs)

        return spied

    for name in ("call", "cast", "close"):
        monkeypatch.setattr(Client, name, spy(name))

    # ... and any thread that waits on the future of a call that is not done yet.
    class WatchedFuture(Future[Any]):
        def result(self, timeout: float | None = None) -> Any:
            if not self.done():
                threads["wait"].add(threading.get_ident())
            return super().result(timeout)

        def exception(self, timeout: float | None = None) -> BaseException | None:
            if not self.done():
                threads["wait"].add(threading.get_ident())
            return super().exception(timeout)

    monkeypatch.setattr(client_module, "Future", WatchedFuture)

    async def main() -> int:
        async with aproxies() as proxy:
            assert await proxy.fib(10) == 55  # the first call connects
            assert await asyncio.gather(*(proxy.echo(i) for i in range(50))) == list(range(50))
            assert await (await proxy.echo.call_async("x")) == "x"
            # a call whose reply cannot arrive before the gate opens: anything waiting
            # for it on the loop thread would be seen (and would keep the gate shut)
            held = asyncio.ensure_future(proxy.held("held"))
            await asyncio.to_thread(gate.wait_entered)
            gate.released.set()
            assert await held == "held"
            await proxy.record.cast("cast")
            assert await asyncio.to_thread(recorder.wait, 2) == ["held", "cast"]
        return threading.get_ident()

    loop_thread = run(main())
    assert threads["call"] and threads["cast"] and threads["close"], threads
    for name, idents in threads.items():
        assert loop_thread not in idents, f"Client.{name} ran on the event loop thread"


def test_nothing_connects_until_the_first_call() -> None:
    # an unreachable broker is fine to configure; only calling fails
    proxy = AsyncRPCProxy("amqp://guest:guest@127.0.0.1:1//", retry_policy={"max_retries": 0})

    async def main() -> None:
        with pytest.raises(ConnectionLostError):
            await proxy.fib(1)
        await proxy.aclose()

    run(main())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"broker": 42}, "broker must be"),
        ({"queue": ""}, "invalid queue name"),
        ({"timeout": 0}, "timeout"),
        ({"serializer": "nope"}, "unknown serializer"),
        ({"retry_policy": {"max_retry": 1}}, "unknown retry_policy keys"),
    ],
)
def test_the_constructor_checks_its_arguments_like_rpc_proxy(kwargs: dict[str, Any], match: str) -> None:
    kwargs.setdefault("broker", "memory://")
    with pytest.raises(ConfigurationError, match=match):
        AsyncRPCProxy(**kwargs)
