"""kombu_rpc.contrib.celery: the worker bootstep and proxy_from_celery.

Most tests drive the bootstep as Celery's worker blueprint does (``include``, ``start``,
``close``, ``stop``) on ``memory://`` or without a broker at all; one starts a real
``celery worker`` process against RabbitMQ.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import WorkerShutdown
from celery.worker import state as worker_state
from kombu import Connection

from kombu_rpc import (
    ConfigurationError,
    ConnectionLostError,
    NoServerError,
    Registry,
    RemoteError,
    RPCProxy,
    RPCServer,
    default_registry,
)
from kombu_rpc.contrib.celery import (
    SERVER_OPTIONS,
    RPCServerStep,
    install,
    proxy_from_celery,
)
from kombu_rpc.testing import unique_queue_name

ROOT = Path(__file__).resolve().parents[2]
#: A port nothing listens on: connecting is refused at once.
UNREACHABLE = "amqp://guest:guest@127.0.0.1:1//"


def make_app(broker: str, **conf: Any) -> Celery:
    app = Celery("kombu_rpc_test", broker=broker, set_as_current=False)
    app.conf.update({"broker_connection_retry_on_startup": True, **conf})
    return app


@pytest.fixture
def memory_app() -> Iterator[Celery]:
    app = make_app("memory://", broker_transport_options={"visibility_timeout": 42})
    yield app
    app.close()


@pytest.fixture
def registry() -> Registry:
    reg = Registry()

    @reg.remote(name="math.add")
    def add(a: int, b: int) -> int:
        return a + b

    return reg


def fake_worker(app: Celery) -> SimpleNamespace:
    """The parts of a ``WorkController`` that the bootstep uses."""
    return SimpleNamespace(app=app, steps=[])


def created_step(app: Celery, **cli: Any) -> tuple[RPCServerStep, SimpleNamespace]:
    """Bind and create the step as the worker blueprint does (``cli``: worker options)."""
    worker = fake_worker(app)
    step = RPCServerStep(worker, **cli)
    step.include(worker)
    return step, worker


# -- the bootstep, in process --------------------------------------------------------


@pytest.mark.timeout(20)
def test_the_step_serves_over_the_app_connection_until_stopped(
    memory_app: Celery, registry: Registry
) -> None:
    queue = unique_queue_name()
    install(memory_app, registry=registry, queue=queue)
    assert RPCServerStep in memory_app.steps["worker"]
    step, worker = created_step(memory_app)
    assert worker.steps == [step]
    server = step.server
    assert server is not None and server.registry is registry and server.queue == queue
    assert server._connection.transport_options["visibility_timeout"] == 42  # the app's settings
    assert not server.ready  # created, not started

    step.start(worker)
    try:
        assert server.ready
        with proxy_from_celery(memory_app, timeout=10) as proxy:
            assert proxy.queue == queue  # kombu_rpc_queue, as set by install()
            assert proxy["math.add"](2, 3) == 5
            pong = proxy["kombu_rpc.ping"]()
            assert (pong["server_id"], pong["queue"]) == (server.server_id, queue)
        assert step.info(worker) == {
            "kombu_rpc": {"queue": queue, "server_id": server.server_id, "ready": True}
        }
    finally:
        step.close(worker)  # a worker shutting down calls close() on every step, then stop()
        step.stop(worker)
    assert not server.ready


@pytest.mark.timeout(20)
def test_a_cold_shutdown_does_not_wait_for_calls_in_flight(memory_app: Celery, registry: Registry) -> None:
    install(memory_app, registry=registry, queue=unique_queue_name())
    step, worker = created_step(memory_app)
    step.start(worker)
    step.terminate(worker)
    assert step.server is not None
    assert step.server.shutdown_timeout == 0
    assert not step.server.ready


@pytest.mark.timeout(10)
def test_worker_options_override_the_configuration(memory_app: Celery) -> None:
    install(memory_app, queue="from.install", concurrency=2)
    step, _ = created_step(memory_app)
    assert step.server is not None
    assert (step.server.queue, step.server.concurrency) == ("from.install", 2)
    assert step.server.registry is default_registry

    step, _ = created_step(memory_app, rpc_queue="from.cli", rpc_concurrency=3, without_rpc=False)
    assert step.server is not None
    assert (step.server.queue, step.server.concurrency) == ("from.cli", 3)


@pytest.mark.timeout(10)
def test_the_server_can_be_turned_off(memory_app: Celery) -> None:
    install(memory_app)
    step, worker = created_step(memory_app, without_rpc=True)
    assert step.server is None and worker.steps == []

    memory_app.conf.kombu_rpc_enabled = False
    step, worker = created_step(memory_app)
    assert step.server is None and worker.steps == []


@pytest.mark.timeout(10)
def test_install_adds_the_worker_options_once(memory_app: Celery) -> None:
    install(memory_app)
    install(memory_app, queue="again")
    names = sorted(option.name for option in memory_app.user_options["worker"])
    assert names == ["rpc_concurrency", "rpc_queue", "without_rpc"]
    assert memory_app.conf.kombu_rpc_queue == "again"

    other = make_app("memory://")
    install(other, cli_options=False)
    assert not other.user_options["worker"]
    assert RPCServerStep in other.steps["worker"]


@pytest.mark.timeout(10)
def test_install_rejects_unknown_options(memory_app: Celery) -> None:
    with pytest.raises(ConfigurationError, match="unknown kombu_rpc server options \\['queues'\\]"):
        install(memory_app, queues="typo")


@pytest.mark.timeout(10)
def test_the_registry_setting_may_be_an_import_path(memory_app: Celery) -> None:
    memory_app.conf.kombu_rpc_registry = "kombu_rpc.registry:default_registry"
    step, _ = created_step(memory_app)
    assert step.server is not None and step.server.registry is default_registry

    memory_app.conf.kombu_rpc_registry = "kombu_rpc.no_such_module:registry"
    with pytest.raises(ConfigurationError, match="cannot import kombu_rpc_registry"):
        created_step(memory_app)

    memory_app.conf.kombu_rpc_registry = "kombu_rpc:remote"
    with pytest.raises(ConfigurationError, match=r"is not a kombu_rpc\.Registry"):
        created_step(memory_app)


@pytest.mark.timeout(10)
def test_invalid_settings_fail_when_the_worker_is_created(memory_app: Celery) -> None:
    memory_app.conf.kombu_rpc_concurrency = 0
    with pytest.raises(ConfigurationError, match="concurrency"):
        created_step(memory_app)


def test_every_server_option_is_an_rpcserver_argument_and_the_reverse() -> None:
    # the broker is the Celery app's
    assert set(SERVER_OPTIONS) == set(inspect.signature(RPCServer).parameters) - {"broker"}


# -- starting without a broker -----------------------------------------------------------


def unreachable_step(**conf: Any) -> tuple[RPCServerStep, SimpleNamespace]:
    """A created step whose broker refuses connections."""
    # No retries inside each of the server's connection attempts: they fail at once.
    app = make_app(UNREACHABLE, kombu_rpc_retry_policy={"max_retries": 0}, **conf)
    step, worker = created_step(app)
    assert step.server is not None
    step.retry_interval = 0.01
    return step, worker


@pytest.mark.timeout(20)
def test_without_retries_on_startup_the_worker_stops_with_the_error() -> None:
    step, worker = unreachable_step(broker_connection_retry_on_startup=False)
    with pytest.raises(ConnectionLostError, match="cannot connect"):
        step.start(worker)


@pytest.mark.timeout(20)
def test_on_startup_the_connection_is_retried_as_celery_does(caplog: pytest.LogCaptureFixture) -> None:
    step, worker = unreachable_step(broker_connection_max_retries=2)
    with caplog.at_level(logging.ERROR, logger="kombu_rpc.contrib.celery"):
        with pytest.raises(ConnectionLostError):
            step.start(worker)
    retries = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert len(retries) == 2 and retries[-1].endswith("(2/2)")


@pytest.mark.timeout(20)
def test_retrying_on_startup_ends_when_the_worker_is_told_to_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    step, worker = unreachable_step(broker_connection_max_retries=None)  # retry forever...
    monkeypatch.setattr(worker_state, "should_stop", 0)  # ...until SIGTERM (EX_OK)
    with pytest.raises(WorkerShutdown):
        step.start(worker)


# -- proxy_from_celery ---------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_the_proxy_takes_the_app_broker_settings() -> None:
    app = make_app(
        "amqp://user:pw@broker.invalid:5673/vhost",
        broker_transport_options={"visibility_timeout": 42},
        broker_connection_timeout=2.5,
        broker_use_ssl=True,
        broker_login_method="AMQPLAIN",
        kombu_rpc_queue="proj.rpc",
        kombu_rpc_secret="s" * 32,
    )
    proxy = proxy_from_celery(app, timeout=3)  # connects on first use only
    try:
        conn = proxy._client._connection
        assert (conn.hostname, conn.port, conn.virtual_host, conn.userid) == (
            "broker.invalid",
            5673,
            "vhost",
            "user",
        )
        assert conn.transport_options["visibility_timeout"] == 42
        assert (conn.connect_timeout, conn.ssl, conn.login_method) == (2.5, True, "AMQPLAIN")
        assert proxy.queue == "proj.rpc" and proxy.timeout == 3
        assert proxy._client._secret == b"s" * 32
    finally:
        proxy.close()
    with proxy_from_celery(app, queue="other.rpc", secret=None) as other:
        assert other.queue == "other.rpc" and other._client._secret is None
    app.close()


@pytest.mark.timeout(30)
def test_kombu_rpc_works_without_celery() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["celery"] = None  # as if Celery were not installed
        import kombu_rpc, kombu_rpc.contrib
        try:
            import kombu_rpc.contrib.celery
        except ImportError as exc:
            print(exc)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=25, check=True
    )
    assert "pip install 'celery>=5.3'" in result.stdout


# -- a real celery worker on RabbitMQ ------------------------------------------------------

PROJECT = '''\
"""A Celery project whose workers also serve remote functions."""

from celery import Celery

from kombu_rpc import remote
from kombu_rpc.contrib.celery import install

app = Celery("proj", broker={broker!r}, backend="rpc://")
app.conf.update(
    broker_connection_retry_on_startup=True,
    # The worker's event loop notices SIGTERM only when it wakes: with a short AMQP
    # heartbeat it does so every second (when idle, it may otherwise sleep for 10 s).
    broker_heartbeat=2,
    task_default_queue={task_queue!r},
)
install(app, queue={rpc_queue!r})


@remote(name="proj.add")
def add(a, b):
    return a + b


@remote(name="proj.fail")
def fail(message):
    raise ValueError(message)


@app.task(name="proj.mul")
def mul(a, b):
    return a * b
'''


def wait_until_served(proxy: RPCProxy, worker: subprocess.Popen[bytes], log: Path) -> Any:
    """Ping the worker's RPC server until it answers; fail if the worker dies first."""
    deadline = time.monotonic() + 30
    while True:
        if worker.poll() is not None:
            pytest.fail(f"the worker exited with {worker.returncode}:\n{log.read_text()}")
        try:
            return proxy.options(timeout=2)["kombu_rpc.ping"]()
        except NoServerError:  # the server has not declared its queue yet
            if time.monotonic() > deadline:
                pytest.fail(f"the worker did not serve within 30s:\n{log.read_text()}")
            time.sleep(0.1)


def delete_queues(url: str, *names: str) -> None:
    """Delete the test's queues, and the exchanges Celery named after them."""
    with Connection(url) as conn:
        for name in names:
            conn.default_channel.queue_delete(name)
            conn.default_channel.exchange_delete(name)


@pytest.mark.timeout(90)
def test_a_celery_worker_serves_remote_functions_and_runs_tasks(amqp_url: str, tmp_path: Path) -> None:
    rpc_queue = unique_queue_name("test.celery-rpc")
    task_queue = unique_queue_name("test.celery-tasks")
    (tmp_path / "proj.py").write_text(
        PROJECT.format(broker=amqp_url, rpc_queue=rpc_queue, task_queue=task_queue)
    )
    log = tmp_path / "worker.log"
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "proj",
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "-l",
        "info",
        "--without-heartbeat",
        "--without-mingle",
        "--without-gossip",
        "-Q",
        task_queue,
        "-n",
        f"{task_queue}@%h",
    ]
    client = make_app(amqp_url, kombu_rpc_queue=rpc_queue, task_default_queue=task_queue)
    client.conf.result_backend = "rpc://"
    with log.open("wb") as output:
        worker = subprocess.Popen(
            command,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": pythonpath},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        with proxy_from_celery(client, timeout=10) as proxy:
            pong = wait_until_served(proxy, worker, log)
            assert pong["queue"] == rpc_queue
            assert proxy["proj.add"](2, 3) == 5
            with pytest.raises(RemoteError) as info:
                proxy["proj.fail"]("bad input")
            assert (info.value.exc_type, info.value.exc_message) == ("ValueError", "bad input")
        # The worker's Celery tasks still run, next to the RPC server.
        assert client.send_task("proj.mul", args=(6, 7)).get(timeout=15) == 42
        client.backend.result_consumer.stop()  # app.close() leaves its connection open

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, log.read_text()
        output_text = log.read_text()
        server_id = re.escape(pong["server_id"])
        assert re.search(
            rf"kombu_rpc server {server_id} serving 2 function\(s\) on '{rpc_queue}'", output_text
        )
        assert "proj.add, proj.fail" in output_text
        assert f"kombu_rpc server {pong['server_id']} on '{rpc_queue}' stopped" in output_text
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        client.pool.force_close_all()  # app.close() only forgets its connection pool
        client.close()
        delete_queues(amqp_url, rpc_queue, task_queue)
