"""The kombu_rpc pytest plugin: fixtures that serve remote functions to a test.

Installing kombu_rpc registers this module as a pytest plugin (the ``pytest11`` entry
point ``kombu_rpc``), so its fixtures are available in every test session; disable it
with ``-p no:kombu_rpc``. From a source checkout that is not installed, load it with
``-p kombu_rpc.testing.pytest_plugin``.

Fixtures (all function-scoped except :func:`rpc_broker_url`):

* :func:`rpc_broker_url`: the broker, from ``--rpc-broker URL``, else the
  :data:`ENV_VAR` environment variable, else ``memory://``.
* :func:`rpc_registry`: the functions served to the test.
* :func:`rpc_queue`: a request queue name unique to the test.
* :func:`rpc_server`: an :class:`~kombu_rpc.server.RPCServer` serving
  :func:`rpc_registry` on :func:`rpc_queue` in a background thread.
* :func:`rpc_proxy`: an :class:`~kombu_rpc.proxy.RPCProxy` calling :func:`rpc_server`.
* :func:`rpc_isolation`: empties the ``memory://`` broker before and after the test.

The ``rpc`` marker sets them per test (see :data:`MARKER_HELP`). The plugin does
nothing to tests that request none of its fixtures.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from kombu_rpc.proxy import RPCProxy
    from kombu_rpc.registry import Registry
    from kombu_rpc.server import RPCServer

# kombu_rpc's modules are imported inside the hooks and fixtures only, so that loading
# this plugin into the test sessions of other projects does nothing on its own. (Python
# still runs kombu_rpc/__init__.py and kombu_rpc/testing/__init__.py before this module;
# they only define names.)

#: The environment variable naming the broker when ``--rpc-broker`` is not given.
ENV_VAR = "KOMBU_RPC_TEST_BROKER_URL"
#: The broker used when neither ``--rpc-broker`` nor :data:`ENV_VAR` is set.
DEFAULT_BROKER_URL = "memory://"
#: The name of the marker: ``@pytest.mark.rpc(...)``.
MARKER = "rpc"
#: The marker's documentation, as listed by ``pytest --markers``.
MARKER_HELP = (
    "rpc(functions=None, timeout=10.0, serializer='json', **server_options): settings "
    "of the kombu_rpc fixtures for this test. functions: a Registry, a mapping of names "
    "to functions, or a list of functions, served instead of rpc_registry's default; "
    "timeout and serializer: for rpc_proxy; any other keyword (concurrency, accept, "
    "send_tracebacks, ...) is passed to the RPCServer of rpc_server. A marker on a test "
    "overrides the same keyword in a marker on its class or module."
)
#: Marker keywords used by :func:`rpc_registry` and :func:`rpc_proxy`; the others go
#: to the server.
_OWN_KEYWORDS = frozenset({"functions", "timeout", "serializer"})
#: Keywords of :class:`~kombu_rpc.server.RPCServer` that the fixtures set themselves.
_FIXED_SERVER_KEYWORDS = frozenset({"self", "broker", "registry", "queue"})

_REGISTRY_FROM_MARKER = pytest.StashKey["Registry"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the ``--rpc-broker URL`` command-line option."""
    group = parser.getgroup("kombu_rpc", "kombu_rpc fixtures")
    group.addoption(
        "--rpc-broker",
        dest="rpc_broker",
        metavar="URL",
        default=None,
        help=f"broker URL for the rpc_* fixtures (default: ${ENV_VAR}, else {DEFAULT_BROKER_URL})",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``rpc`` marker."""
    config.addinivalue_line("markers", MARKER_HELP)


def pytest_report_header(config: pytest.Config) -> str | None:
    """Name the broker in the session header, when one was chosen explicitly."""
    if config.getoption("rpc_broker") is None and not os.environ.get(ENV_VAR):
        return None
    from kombu.utils.url import maybe_sanitize_url

    return f"kombu_rpc broker: {maybe_sanitize_url(_configured_broker_url(config))}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Show the server's traceback of a :class:`~kombu_rpc.errors.RemoteError` that
    failed a test (directly, or as the cause of what failed it) in a report section of
    its own, as the server formatted it."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not report.failed or call.excinfo is None:
        return
    from kombu_rpc.errors import RemoteError

    error: BaseException | None = call.excinfo.value
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RemoteError) and error.remote_traceback:
            report.sections.append(("kombu_rpc: the server's traceback", error.remote_traceback.rstrip()))
            return
        error = error.__cause__ or error.__context__


def _configured_broker_url(config: pytest.Config) -> str:
    """Return the broker URL chosen for a session.

    ``--rpc-broker`` wins over the :data:`ENV_VAR` environment variable, which wins
    over :data:`DEFAULT_BROKER_URL`. An empty value counts as not set.
    """
    option: str | None = config.getoption("rpc_broker")
    return option or os.environ.get(ENV_VAR) or DEFAULT_BROKER_URL


def _marker_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Return the keywords of the ``rpc`` markers that apply to a test, merged.

    A marker closer to the test (on the function, then its class, then its module)
    overrides the keywords it repeats. Fails the test's setup when a marker has
    positional arguments or an unknown keyword.
    """
    from kombu_rpc.server import RPCServer

    settings: dict[str, Any] = {}
    for mark in reversed(list(request.node.iter_markers(MARKER))):
        if mark.args:
            pytest.fail(
                f"@pytest.mark.{MARKER} takes keyword arguments only, got {mark.args!r}", pytrace=False
            )
        settings.update(mark.kwargs)
    server_keywords = set(inspect.signature(RPCServer).parameters) - _FIXED_SERVER_KEYWORDS
    unknown = set(settings) - _OWN_KEYWORDS - server_keywords
    if unknown:
        pytest.fail(
            f"unknown @pytest.mark.{MARKER} keyword(s) {sorted(unknown)}; "
            f"allowed: {sorted(_OWN_KEYWORDS | server_keywords)}",
            pytrace=False,
        )
    return settings


@pytest.fixture(scope="session")
def rpc_broker_url(pytestconfig: pytest.Config) -> str:
    """The broker URL of the rpc fixtures.

    ``--rpc-broker URL`` wins over the :data:`ENV_VAR` environment variable, which
    wins over :data:`DEFAULT_BROKER_URL`; an empty value counts as not set.
    Session-scoped. Override it to choose the broker in code, or parametrize an
    override to run tests on several brokers.
    """
    return _configured_broker_url(pytestconfig)


@pytest.fixture
def rpc_isolation(rpc_broker_url: str) -> Iterator[None]:
    """Empty the ``memory://`` broker before and after the test, when it is the broker.

    :func:`rpc_server` requests it, so any test using the rpc fixtures starts with no
    memory queue, exchange or binding left by earlier code, and leaves none behind (see
    :func:`~kombu_rpc.testing.reset_memory_transport`). Override it with a fixture that
    yields without doing anything if you keep ``memory://`` servers running across
    tests (in a session-scoped fixture): the reset would delete their queues.
    """
    from kombu_rpc.testing import is_memory_broker, reset_memory_transport

    memory = is_memory_broker(rpc_broker_url)
    if memory:
        reset_memory_transport()
    yield
    if memory:
        reset_memory_transport()


@pytest.fixture
def rpc_queue(request: pytest.FixtureRequest) -> str:
    """A request queue name no other test uses: ``test.<test name>.<random id>``."""
    from kombu_rpc.testing import unique_queue_name

    name = re.sub(r"[^A-Za-z0-9_-]+", "_", request.node.name)[:100]
    return unique_queue_name(f"test.{name}")


@pytest.fixture
def rpc_registry(request: pytest.FixtureRequest) -> Registry:
    """The functions :func:`rpc_server` serves: a new registry for each test.

    It holds the functions given to the marker's ``functions`` keyword if there is one,
    else a copy of :data:`~kombu_rpc.registry.default_registry` as it is when the test
    starts, that is every function registered with ``@remote`` by the modules imported
    so far (test modules are all imported before the first test runs). Being a copy, it
    can be changed in a test without changing other tests: a function registered in
    it, even once the server runs, is served from the next call on.

    Override it to serve a registry of your own; the marker's ``functions`` cannot then
    be used.
    """
    from kombu_rpc.testing import copy_registry, make_registry

    settings = _marker_settings(request)
    if "functions" not in settings:
        return copy_registry()
    registry = make_registry(settings["functions"])
    if registry is settings["functions"]:  # a Registry given to the marker: keep it apart
        registry = copy_registry(registry)
    request.node.stash[_REGISTRY_FROM_MARKER] = registry
    return registry


@pytest.fixture
def rpc_server(
    request: pytest.FixtureRequest,
    rpc_broker_url: str,
    rpc_registry: Registry,
    rpc_queue: str,
    rpc_isolation: None,
) -> Iterator[RPCServer]:
    """An :class:`~kombu_rpc.server.RPCServer` serving :func:`rpc_registry` to the test.

    It consumes :func:`rpc_queue` on :func:`rpc_broker_url` in a background thread,
    from before the test starts until it ends; then it is stopped and its request queue
    deleted. Marker keywords other than ``functions``, ``timeout`` and ``serializer``
    are passed to the server: ``@pytest.mark.rpc(concurrency=4)``.
    """
    from kombu_rpc.testing import running_server

    settings = _marker_settings(request)
    if "functions" in settings and request.node.stash.get(_REGISTRY_FROM_MARKER, None) is not rpc_registry:
        pytest.fail(
            f"@pytest.mark.{MARKER}(functions=...) cannot be used with an overridden rpc_registry "
            "fixture: register the functions in that registry instead",
            pytrace=False,
        )
    server_kwargs = {key: value for key, value in settings.items() if key not in _OWN_KEYWORDS}
    with running_server(rpc_registry, rpc_broker_url, rpc_queue, **server_kwargs) as server:
        yield server


@pytest.fixture
def rpc_proxy(
    request: pytest.FixtureRequest, rpc_broker_url: str, rpc_server: RPCServer
) -> Iterator[RPCProxy]:
    """An :class:`~kombu_rpc.proxy.RPCProxy` calling :func:`rpc_server`, closed after the test.

    Requesting it starts :func:`rpc_server`. Its ``timeout`` (default
    :data:`~kombu_rpc.testing.DEFAULT_TIMEOUT` seconds) and ``serializer`` (default
    ``"json"``) come from the marker: ``@pytest.mark.rpc(timeout=0.5)``.
    """
    from kombu_rpc.proxy import RPCProxy
    from kombu_rpc.testing import DEFAULT_TIMEOUT

    settings = _marker_settings(request)
    with RPCProxy(
        rpc_broker_url,
        queue=rpc_server.queue,
        timeout=settings.get("timeout", DEFAULT_TIMEOUT),
        serializer=settings.get("serializer", "json"),
    ) as proxy:
        yield proxy
