"""The pytest plugin, exercised by running pytest on user test files with ``pytester``.

The inner runs happen in this process (``pytester.runpytest``), so they share
``kombu_rpc.default_registry`` and the memory broker with this test session.
"""

from __future__ import annotations

import configparser
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection

from kombu_rpc import default_registry
from kombu_rpc.testing import PLUGIN, pytest_plugin_args

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
ENV_VAR = "KOMBU_RPC_TEST_BROKER_URL"  # spelled out: a typo in the plugin must fail a test


@pytest.fixture(autouse=True)
def isolated_inner_runs(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Inner runs: as strict as this project, default broker, no @remote left behind."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    pytester.makeini("[pytest]\naddopts = --strict-markers\nfilterwarnings = error\n")
    before = set(default_registry.names())
    yield
    for name in set(default_registry.names()) - before:
        default_registry.unregister(name)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run pytest on the files made in ``pytester.path``, with the plugin loaded."""
    return pytester.runpytest(*pytest_plugin_args(), "-p", "no:cacheprovider", *args)


def entry_points_in_setup_cfg() -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    raw = config.get("options.entry_points", "pytest11", fallback="")
    return [" ".join(line.split()) for line in raw.splitlines() if line.strip()]


def test_a_user_test_calls_its_remote_functions_through_rpc_proxy(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user="""
        from kombu_rpc import remote

        @remote
        def double(x):
            return 2 * x

        @remote(name="text.shout")
        def shout(text):
            return text.upper() + "!"

        def test_remote_calls(rpc_proxy):
            assert rpc_proxy.double(21) == 42
            assert rpc_proxy.text.shout("hi") == "HI!"
        """
    )
    run(pytester).assert_outcomes(passed=1)


def test_a_failing_remote_call_shows_the_servers_traceback_not_the_librarys_frames(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_user="""
        import pytest

        def ratio(a, b):
            return a / b

        @pytest.mark.rpc(functions=[ratio])
        def test_ratio(rpc_proxy):
            assert rpc_proxy.ratio(1, 0) == 0
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E       kombu_rpc.errors.RemoteError: ZeroDivisionError: division by zero",
            "*kombu_rpc: the server's traceback*",
            "*in ratio",
            "    return a / b",
        ]
    )
    failure = result.stdout.str().split("kombu_rpc: the server's traceback")[0]
    assert "kombu_rpc/_client.py" not in failure and "parse_reply" not in failure


def test_remote_exceptions_surface_as_remote_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_errors="""
        import pytest
        from kombu_rpc import MethodNotFound, RemoteError, remote

        @remote
        def refuse(reason):
            raise ValueError(reason)

        def test_caught(rpc_proxy):
            with pytest.raises(RemoteError) as info:
                rpc_proxy.refuse("the server said no")
            assert info.value.exc_type == "ValueError"
            assert info.value.exc_message == "the server said no"
            assert "in refuse" in info.value.remote_traceback
            with pytest.raises(MethodNotFound):
                rpc_proxy.not_served()

        def test_uncaught(rpc_proxy):
            rpc_proxy.refuse("nobody catches this")
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*RemoteError: ValueError: nobody catches this*"])


def test_tests_are_isolated_from_each_other(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_isolation="""
        import pytest
        from kombu.transport import memory
        from kombu_rpc import CallError, MethodNotFound
        from kombu_rpc.connection import connect

        first = {}

        def test_first(rpc_queue, rpc_registry, rpc_server, rpc_proxy):
            first.update(queue=rpc_queue, server=rpc_server, proxy=rpc_proxy)
            rpc_registry.register(lambda: "first", name="only_in_first")
            assert rpc_proxy.only_in_first() == "first"
            with connect("memory://") as conn, conn.SimpleQueue("leftover") as queue:
                queue.put({"stale": True})
            assert "leftover" in memory.Channel.queues
            assert "leftover" in memory.Transport.global_state.exchanges

        def test_second(rpc_queue, rpc_registry, rpc_proxy):
            assert rpc_queue != first["queue"]
            assert "only_in_first" not in rpc_registry
            with pytest.raises(MethodNotFound):
                rpc_proxy.only_in_first()
            assert "leftover" not in memory.Channel.queues
            assert "leftover" not in memory.Transport.global_state.exchanges
            assert first["queue"] not in memory.Channel.queues
            assert not first["server"].ready
            with pytest.raises(CallError):
                first["proxy"].only_in_first()
        """
    )
    run(pytester).assert_outcomes(passed=2)


def test_tests_without_rpc_fixtures_are_left_alone(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_alone="""
        from kombu.transport import memory
        from kombu_rpc.connection import connect

        def test_leaves_a_queue():
            with connect("memory://") as conn, conn.SimpleQueue("kept") as queue:
                queue.put("still here")

        def test_finds_it():
            assert "kept" in memory.Channel.queues
            with connect("memory://") as conn, conn.SimpleQueue("kept") as queue:
                assert queue.get(timeout=1).payload == "still here"
        """
    )
    run(pytester).assert_outcomes(passed=2)


def test_the_marker_sets_functions_server_and_proxy_options(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_marker="""
        import threading
        import pytest

        barrier = threading.Barrier(3, timeout=5)

        def meet():
            return barrier.wait()

        def add(a, b):
            return a + b

        @pytest.mark.rpc(functions=[meet, add], concurrency=3, timeout=7.5)
        def test_settings(rpc_registry, rpc_server, rpc_proxy):
            assert rpc_registry.names() == rpc_server.registry.names() == ["add", "meet"]
            assert rpc_server.concurrency == 3
            assert rpc_proxy.timeout == 7.5
            calls = [rpc_proxy.meet.call_async() for _ in range(3)]
            assert sorted(call.result() for call in calls) == [0, 1, 2]  # all ran at once

        def test_defaults(rpc_server, rpc_proxy):
            assert rpc_server.concurrency == 1
            assert rpc_proxy.timeout == 10.0
            assert "add" not in rpc_server.registry

        @pytest.mark.rpc(timeout=2.0, functions={"math.add": add})
        class TestClassMarker:
            def test_inherited(self, rpc_proxy):
                assert rpc_proxy.timeout == 2.0
                assert rpc_proxy.math.add(1, 2) == 3

            @pytest.mark.rpc(timeout=3.0)
            def test_closest_marker_wins(self, rpc_proxy):
                assert rpc_proxy.timeout == 3.0
                assert rpc_proxy.math.add(2, 2) == 4
        """
    )
    run(pytester).assert_outcomes(passed=4)


def test_marker_misuse_is_reported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_misuse="""
        import pytest
        from kombu_rpc import Registry

        def add(a, b):
            return a + b

        @pytest.mark.rpc([add])
        def test_positional(rpc_proxy):
            pass

        @pytest.mark.rpc(concurency=2)
        def test_misspelt(rpc_proxy):
            pass

        class TestOwnRegistry:
            @pytest.fixture
            def rpc_registry(self):
                return Registry()

            @pytest.mark.rpc(functions=[add])
            def test_functions_with_overridden_registry(self, rpc_proxy):
                pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines_random(
        [
            "*@pytest.mark.rpc takes keyword arguments only*",
            "*unknown @pytest.mark.rpc keyword(s)*'concurency'*allowed*'concurrency'*",
            "*@pytest.mark.rpc(functions=...) cannot be used with an overridden rpc_registry*",
        ]
    )


def test_the_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--markers")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["@pytest.mark.rpc(functions=None, timeout=10.0, *"])


@pytest.mark.parametrize(
    ("env", "option", "expected"),
    [
        (None, None, "memory://"),
        ("", None, "memory://"),
        ("redis://env.invalid:6379/0", None, "redis://env.invalid:6379/0"),
        ("redis://env.invalid:6379/0", "amqp://option.invalid//", "amqp://option.invalid//"),
        (None, "amqp://option.invalid//", "amqp://option.invalid//"),
    ],
)
def test_broker_url_comes_from_option_then_env_then_memory(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    env: str | None,
    option: str | None,
    expected: str,
) -> None:
    if env is not None:
        monkeypatch.setenv(ENV_VAR, env)
    pytester.makepyfile(
        test_url=f"""
        def test_url(rpc_broker_url):
            assert rpc_broker_url == {expected!r}
        """
    )
    run(pytester, *([] if option is None else ["--rpc-broker", option])).assert_outcomes(passed=1)


def test_an_explicit_broker_is_named_in_the_header_without_its_password(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_nothing="def test_nothing(): pass")
    result = run(pytester, "--rpc-broker", "amqp://user:secret@broker.invalid//")
    result.stdout.fnmatch_lines(["kombu_rpc broker: amqp://user:**@broker.invalid//"])
    assert "secret" not in result.stdout.str()
    assert "kombu_rpc broker" not in run(pytester).stdout.str()  # quiet by default


def test_rpc_broker_option_serves_on_rabbitmq(pytester: pytest.Pytester, amqp_url: str) -> None:
    pytester.makepyfile(
        test_rabbitmq=f"""
        from pathlib import Path
        from kombu import Connection
        from kombu.transport import memory
        from kombu_rpc import remote

        @remote
        def where():
            return "served"

        def test_on_rabbitmq(rpc_broker_url, rpc_queue, rpc_proxy):
            assert rpc_broker_url == {amqp_url!r}
            assert rpc_proxy.where() == "served"
            with Connection(rpc_broker_url) as conn:  # passive: fails unless the queue exists
                _, _, consumers = conn.default_channel.queue_declare(rpc_queue, passive=True)
            assert consumers == 1
            assert rpc_queue not in memory.Channel.queues
            Path("queue.txt").write_text(rpc_queue)
        """
    )
    run(pytester, "--rpc-broker", amqp_url).assert_outcomes(passed=1)
    queue = (pytester.path / "queue.txt").read_text()
    with Connection(amqp_url) as conn:  # the request queue was deleted at teardown
        with pytest.raises(conn.channel_errors):
            conn.default_channel.queue_declare(queue, passive=True)


def test_the_entry_point_is_declared_in_setup_cfg() -> None:
    assert f"kombu_rpc = {PLUGIN}" in entry_points_in_setup_cfg()
    assert importlib.util.find_spec(PLUGIN) is not None


def test_the_declared_entry_point_loads_the_plugin(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """As if kombu_rpc were installed: a distribution declaring setup.cfg's pytest11."""
    dist_info = tmp_path / "site" / "kombu_rpc_declared-0.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: kombu-rpc-declared\nVersion: 0.0\n")
    (dist_info / "entry_points.txt").write_text("[pytest11]\n" + "\n".join(entry_points_in_setup_cfg()))
    monkeypatch.syspath_prepend(dist_info.parent)
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    assert pytest_plugin_args() == []  # no "-p": pytest would register the plugin twice
    pytester.makepyfile(
        test_installed="""
        def test_fixture_available(rpc_proxy):
            assert rpc_proxy.timeout == 10.0
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    disabled = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:kombu_rpc")
    disabled.assert_outcomes(errors=1)
    disabled.stdout.fnmatch_lines(["*fixture 'rpc_proxy' not found*"])


def test_without_the_entry_point_the_plugin_is_named_with_p() -> None:
    if pytest_plugin_args() == []:
        pytest.skip("kombu_rpc is installed with its entry point here")
    assert pytest_plugin_args() == ["-p", PLUGIN]
