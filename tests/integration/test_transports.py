"""kombu_rpc on kombu transports it drives as "polling": the filesystem transport,
SQLAlchemy on SQLite and SQLAlchemy on PostgreSQL.

Each transport gets one server in a process of its own (``transport_server.py``), shared
by the transport's tests; the tests call it from this process. kombu polls every queue
on these transports, every :data:`kombu_rpc._transports.POLLING_INTERVAL` seconds as
kombu_rpc sets it, so a call waits about half a poll for the request and half a poll
for the reply.

``filesystem://`` gets kombu_rpc's filesystem transport
(:mod:`kombu_rpc._transports.filesystem`): kombu's own loses a message now and then to a
consumer that reads its file before the producer has written it.

PostgreSQL is ``KOMBU_RPC_TEST_POSTGRES_URL`` (default :data:`DEFAULT_POSTGRES_URL`). If
it, SQLAlchemy or the database driver is unavailable, its tests are skipped, or fail
when ``KOMBU_RPC_REQUIRE_BROKERS=1`` (as in CI). The tests leave no row of theirs in its
``kombu_queue`` and ``kombu_message`` tables (kombu creates the tables themselves).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic
from typing import Any

import pytest
from kombu import Connection

from kombu_rpc import RemoteError, RPCProxy, RPCTimeout
from kombu_rpc.testing import unique_queue_name
from kombu_rpc.topology import BROADCAST_QUEUE_TEMPLATE, CONTROL_QUEUE_TEMPLATE

pytestmark = [
    pytest.mark.timeout(20),
    # kombu's SQLAlchemy models ask for lazy="noload", which SQLAlchemy 2.1 deprecates
    # when it first configures them (in whichever thread first touches the tables).
    pytest.mark.filterwarnings("default:The ``noload`` loader strategy is deprecated:DeprecationWarning"),
]

POSTGRES_ENV = "KOMBU_RPC_TEST_POSTGRES_URL"
#: psycopg2 named: SQLAlchemy 2.1's default PostgreSQL driver is psycopg (3).
DEFAULT_POSTGRES_URL = "sqla+postgresql+psycopg2://kombu_rpc:kombu_rpc@127.0.0.1:5432/kombu_rpc_test"
SERVER_PROGRAM = Path(__file__).with_name("transport_server.py")
REPO = Path(__file__).resolve().parents[2]
#: Longest wait for the server process to say it consumes its queue.
START_TIMEOUT = 15.0
#: Longest wait for the server process to stop after SIGTERM (it first finishes its
#: calls in flight), before it is killed.
STOP_TIMEOUT = 10.0
#: How late past its deadline a call may raise RPCTimeout.
DEADLINE_SLACK = 0.05
TRANSPORTS = ["filesystem", "sqlite", "postgresql"]


def unavailable(reason: str) -> None:
    """Skip the test, or fail it when brokers are required (as tests/conftest.py does
    for an unreachable broker)."""
    if os.environ.get("KOMBU_RPC_REQUIRE_BROKERS") == "1":
        pytest.fail(f"{reason} (KOMBU_RPC_REQUIRE_BROKERS=1)", pytrace=False)
    pytest.skip(reason)


def sql_unavailable_reason(url: str) -> str | None:
    """Why the ``sqla+`` broker ``url`` cannot be used here, or None."""
    try:
        import sqlalchemy
    except ImportError:
        return "SQLAlchemy is not installed"
    database = url.partition("+")[2]
    try:
        options: dict[str, Any] = {}
        if sqlalchemy.make_url(database).get_dialect().driver == "psycopg2":
            options["connect_args"] = {"connect_timeout": 5}
        engine = sqlalchemy.create_engine(database, **options)
    except Exception as exc:  # the driver is not installed, or the URL is wrong
        return f"cannot use {url}: {exc!r}"
    try:
        with engine.connect() as db:
            db.execute(sqlalchemy.text("SELECT 1"))
    except Exception as exc:
        return f"database {url} is unreachable: {exc!r}"
    finally:
        engine.dispose()
    return None


def delete_sql_queues(url: str, names: set[str]) -> None:
    """Delete the rows of kombu's SQLAlchemy transport for the queues ``names``.

    kombu's ``queue_delete`` on that transport only purges: it deletes the queue's
    messages (also those delivered, which it keeps, invisible) but not its row.
    """
    import sqlalchemy

    engine = sqlalchemy.create_engine(url.partition("+")[2])
    try:
        if not sqlalchemy.inspect(engine).has_table("kombu_queue"):
            return
        by_name = {"names": sorted(names)}
        with engine.begin() as db:
            for statement in (
                "DELETE FROM kombu_message WHERE queue_id IN "
                "(SELECT id FROM kombu_queue WHERE name IN :names)",
                "DELETE FROM kombu_queue WHERE name IN :names",
            ):
                query = sqlalchemy.text(statement).bindparams(sqlalchemy.bindparam("names", expanding=True))
                db.execute(query, by_name)
    finally:
        engine.dispose()


@dataclass
class Served:
    """A transport whose server runs in its own process."""

    transport: str
    url: str
    transport_options: dict[str, Any]
    transport_cls: type | None
    queue: str
    server_id: str = ""
    #: Every queue the tests and the server used (to delete from a database).
    queues: set[str] = field(default_factory=set)

    @property
    def broker(self) -> Connection | str:
        """What the tests hand RPCProxy: a URL, or a Connection with the options."""
        if self.transport_cls or self.transport_options:
            return Connection(
                self.url, transport=self.transport_cls, transport_options=self.transport_options
            )
        return self.url

    def proxy(self, queue: str | None = None, timeout: float = 10.0) -> RPCProxy:
        proxy = RPCProxy(self.broker, queue=queue or self.queue, timeout=timeout)
        self.queues.update((proxy.queue, proxy.reply_queue))
        return proxy


def broker_for(transport: str, folder: Path) -> tuple[str, dict[str, Any], type | None]:
    """The URL, transport options and transport class (None: the URL's) of
    ``transport``, its files in ``folder``."""
    if transport == "filesystem":
        # One folder in and out: the proxy and the server read what the other wrote.
        # The control folder holds the exchange tables, by default in the working dir.
        # The URL gets kombu_rpc's filesystem transport, which writes whole files.
        folders = {name: folder / name for name in ("data", "processed", "control")}
        for path in folders.values():
            path.mkdir()
        return (
            "filesystem://",
            {
                "data_folder_in": str(folders["data"]),
                "data_folder_out": str(folders["data"]),
                "store_processed": True,
                "processed_folder": str(folders["processed"]),
                "control_folder": str(folders["control"]),
            },
            None,
        )
    if transport == "sqlite":
        url = f"sqla+sqlite:///{folder / 'broker.db'}"
    else:
        url = os.environ.get(POSTGRES_ENV) or DEFAULT_POSTGRES_URL
    reason = sql_unavailable_reason(url)
    if reason is not None:
        unavailable(reason)
    return url, {}, None


def wait_ready(process: subprocess.Popen[bytes], log: Path, queue: str) -> str:
    """Wait for the server's line saying it consumes ``queue``; its server id."""
    ready = re.compile(rf"server ([0-9a-f]+) consuming '{re.escape(queue)}'")
    deadline = monotonic() + START_TIMEOUT
    while True:
        text = log.read_text(errors="replace")
        found = ready.search(text)
        if found:
            return found.group(1)
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode} while starting:\n{text}")
        if monotonic() > deadline:
            raise AssertionError(f"the server did not consume within {START_TIMEOUT} s:\n{text}")
        time.sleep(0.02)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server gracefully, or kill it after :data:`STOP_TIMEOUT`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)
    if process.stdin is not None:
        process.stdin.close()


@pytest.fixture(scope="module", params=TRANSPORTS)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A server of the transport's own in a process of its own, for all its tests."""
    transport: str = request.param
    folder = tmp_path_factory.mktemp(f"transport-{transport}")
    try:
        url, options, transport_cls = broker_for(transport, folder)
        queue = unique_queue_name(f"test.transports.{transport}")
        served = Served(transport, url, options, transport_cls, queue)
        spec = {
            "url": url,
            "transport_options": options,
            "transport": transport_cls and f"{transport_cls.__module__}:{transport_cls.__qualname__}",
        }
        log = folder / "server.log"
        pythonpath = os.environ.get("PYTHONPATH", "")
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [
                    sys.executable,
                    str(SERVER_PROGRAM),
                    json.dumps(spec),
                    served.queue,
                ],
                stdin=subprocess.PIPE,  # its end closing stops the server
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=folder,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), pythonpath)))},
            )
        try:
            served.server_id = wait_ready(process, log, served.queue)
            served.queues.update(
                (
                    served.queue,
                    CONTROL_QUEUE_TEMPLATE.format(server_id=served.server_id),
                    BROADCAST_QUEUE_TEMPLATE.format(queue=served.queue, server_id=served.server_id),
                )
            )
            with served.proxy() as proxy:  # every table and folder is there before the tests
                assert proxy.echo("ready") == "ready"
            yield served
        finally:
            try:
                stop(process)
            finally:
                if url.startswith("sqla+"):
                    delete_sql_queues(url, served.queues)
        output = log.read_text(errors="replace")
        assert process.returncode == 0, f"the server did not stop cleanly:\n{output}"
        assert "stopped" in output, output
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def proxies(served: Served) -> Iterator[Callable[..., RPCProxy]]:
    """Make proxies of the transport's broker; all closed when the test ends."""
    made: list[RPCProxy] = []

    def make(**kwargs: Any) -> RPCProxy:
        made.append(served.proxy(**kwargs))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture
def proxy(proxies: Callable[..., RPCProxy]) -> RPCProxy:
    return proxies()


def test_a_call_returns_its_result(proxy: RPCProxy) -> None:
    assert proxy.add(2, 3) == 5
    value = {"text": "zß€", "items": [1, 2.5, None, True], "nested": {"k": []}}
    assert proxy.echo(value) == value


def test_a_remote_exception_comes_back_as_a_remote_error_with_its_type(proxy: RPCProxy) -> None:
    with pytest.raises(RemoteError) as info:
        proxy.boom("bad input")
    assert type(info.value) is RemoteError
    assert info.value.exc_type == "ValueError"
    assert info.value.exc_message == "bad input"
    assert "ValueError" in info.value.remote_traceback
    assert proxy.add(1, 1) == 2  # and the proxy goes on working


def test_many_futures_at_once_all_resolve(proxy: RPCProxy) -> None:
    futures = [proxy.add.call_async(i, 1000) for i in range(20)]
    assert [future.result(timeout=10) for future in futures] == [i + 1000 for i in range(20)]


def test_threads_sharing_a_proxy_each_get_their_own_results(proxy: RPCProxy) -> None:
    threads, calls = 8, 5
    start = threading.Barrier(threads)
    results: dict[int, list[Any]] = {}
    errors: list[BaseException] = []

    def caller(n: int) -> None:
        try:
            start.wait(10)
            results[n] = [proxy.echo([n, i]) for i in range(calls)]
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=caller, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(15)
    assert not errors, errors
    assert results == {n: [[n, i] for i in range(calls)] for n in range(threads)}


def test_a_broadcast_gets_the_servers_answer_where_exchanges_are_shared(
    served: Served, proxy: RPCProxy
) -> None:
    """The proxy's thread reads while a broadcast waits (its callers do not poll).
    kombu's SQLAlchemy transport keeps fanout bindings in the memory of the process
    that made them, so a broadcast reaches no server in another process there."""
    if served.transport == "filesystem":  # bindings in the control folder, shared
        [reply] = proxy["kombu_rpc.ping"].broadcast(timeout=5, expect=1)
        assert reply.server_id == served.server_id and reply.get()["queue"] == served.queue
    else:
        assert proxy["kombu_rpc.ping"].broadcast(timeout=0.5) == []


def test_with_no_server_a_call_times_out_at_its_deadline(
    served: Served, proxies: Callable[..., RPCProxy]
) -> None:
    proxy = proxies(queue=unique_queue_name("test.transports.nobody"), timeout=0.5)
    with pytest.raises(RPCTimeout):
        proxy.echo("connects first")  # its deadline counts from after connecting
    began = monotonic()
    with pytest.raises(RPCTimeout) as info:
        proxy.echo("nobody answers")
    elapsed = monotonic() - began
    print(f"\n{served.transport}: RPCTimeout with no server after {elapsed * 1000:.0f} ms")
    assert info.value.timeout == 0.5
    assert 0.5 <= elapsed <= 0.5 + DEADLINE_SLACK, elapsed


def test_a_slow_call_times_out_at_its_deadline_and_the_proxy_goes_on(served: Served, proxy: RPCProxy) -> None:
    assert proxy.echo("warm-up") == "warm-up"
    late: dict[float, float] = {}
    for timeout in (0.2, 0.5, 1.2):
        began = monotonic()
        with pytest.raises(RPCTimeout) as info:
            proxy.options(timeout=timeout).sleep(timeout + 0.3)
        late[timeout] = monotonic() - began - timeout
        assert info.value.timeout == timeout
    print(
        f"\n{served.transport}: RPCTimeout late by", {t: f"{past * 1000:.0f} ms" for t, past in late.items()}
    )
    assert all(0 <= past <= DEADLINE_SLACK for past in late.values()), late
    # the replies that come too late are dropped; the next call gets its own
    assert proxy.echo("after") == "after"
    assert proxy.add(2, 2) == 4


def test_calls_poll_at_kombu_rpcs_interval(served: Served, proxy: RPCProxy) -> None:
    assert proxy.echo(0) == 0
    took = []
    for i in range(20):
        began = monotonic()
        assert proxy.echo(i) == i
        took.append(monotonic() - began)
    median = statistics.median(took)
    print(
        f"\n{served.transport}: median {median * 1000:.0f} ms, "
        f"min {min(took) * 1000:.0f} ms, max {max(took) * 1000:.0f} ms per call"
    )
    # About one polling interval (0.05 s): half a poll for the request, half for the
    # reply; kombu's own default interval (1 s) would make it a second.
    assert median < 0.3, took
