"""The public surface: exported names, errors, constructor validation."""

from __future__ import annotations

import copy
import importlib.util
import pickle

import pytest

import kombu_rpc
from kombu_rpc import (
    ConfigurationError,
    InvalidArguments,
    MethodNotFound,
    RemoteError,
    RPCError,
    RPCProxy,
    RPCServer,
    RPCTimeout,
)
from kombu_rpc.errors import remote_error_from_wire


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in vars(kombu_rpc) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(kombu_rpc, name)).__name__ == "module"}
    assert set(kombu_rpc.__all__) == public - modules
    for contract in [
        "remote",
        "Registry",
        "default_registry",
        "RPCServer",
        "RPCProxy",
        "RPCError",
        "RemoteError",
        "MethodNotFound",
        "RPCTimeout",
        "IdleTimeout",
        "Stream",
        "AsyncStream",
    ]:
        assert contract in kombu_rpc.__all__


def test_error_hierarchy() -> None:
    assert issubclass(RPCTimeout, RPCError) and issubclass(RPCTimeout, TimeoutError)
    assert issubclass(kombu_rpc.IdleTimeout, RPCTimeout)
    assert issubclass(MethodNotFound, RemoteError) and issubclass(RemoteError, RPCError)
    assert issubclass(ConfigurationError, ValueError)


@pytest.mark.parametrize(
    "error",
    [
        RemoteError("ValueError", "bad n", "Traceback..."),
        MethodNotFound("MethodNotFound", "no f"),
        RPCTimeout("fib", 2.5),
        kombu_rpc.IdleTimeout("count", 1.5),
    ],
)
def test_errors_pickle_and_copy_intact(error: RPCError) -> None:
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert type(clone) is type(error) and str(clone) == str(error) and vars(clone) == vars(error)


def test_wire_errors_map_to_classes() -> None:
    error = remote_error_from_wire({"kind": "invalid_arguments", "type": "TypeError", "message": "m"})
    assert type(error) is InvalidArguments and str(error) == "TypeError: m"
    assert type(remote_error_from_wire({"kind": "unheard-of", "type": "X"})) is RemoteError
    assert remote_error_from_wire("junk").exc_type == "MalformedReply"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"broker": 42}, "broker must be"),
        ({"broker": "nosuch://x"}, "unknown or unavailable transport"),
        ({"queue": ""}, "invalid queue name"),
        ({"queue": "amq.x"}, "reserved"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": "1"}, "timeout"),
        ({"serializer": "nope"}, "unknown serializer"),
        ({"retry_policy": {"max_retry": 1}}, "unknown retry_policy keys"),
    ],
)
def test_proxy_rejects_bad_options(kwargs: dict[str, object], match: str) -> None:
    kwargs.setdefault("broker", "memory://")
    with pytest.raises(ConfigurationError, match=match):
        RPCProxy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
        ({"accept": "json"}, "accept"),
        ({"accept": ["json", "nope"]}, "unknown serializer"),
        ({"registry": {}}, "registry"),
        ({"queue": "has space"}, "invalid queue name"),
    ],
)
def test_server_rejects_bad_options(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        RPCServer("memory://", **kwargs)  # type: ignore[arg-type]


def test_proxy_rejects_invalid_method_names_before_sending() -> None:
    with RPCProxy("memory://", queue="unused") as proxy:
        with pytest.raises(ConfigurationError, match="invalid remote name"):
            proxy["bad name"]()
        with pytest.raises(AttributeError):
            proxy._private  # noqa: B018


def test_nothing_connects_until_the_first_call() -> None:
    # an unreachable broker is fine to configure; only calling fails
    proxy = RPCProxy("amqp://guest:guest@127.0.0.1:1//", retry_policy={"max_retries": 0})
    with pytest.raises(kombu_rpc.ConnectionLostError):
        proxy.fib(1)
    proxy.close()


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "10"])
def test_max_message_size_must_be_a_positive_int(size: object) -> None:
    with pytest.raises(ConfigurationError, match="max_message_size"):
        RPCServer("memory://", max_message_size=size)  # type: ignore[arg-type]


def test_a_blocking_call_cannot_outlive_its_timeout_even_if_the_deadline_thread_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from kombu_rpc._pending import PendingCalls

    monkeypatch.setattr(PendingCalls, "_watch", lambda self: None)  # a deadline thread that never fires
    with RPCProxy("memory://", queue="test.nobody-serves-this", timeout=0.1) as proxy:
        with pytest.raises(RPCTimeout):
            proxy.fib(1)
    assert "outlived its deadline" in caplog.text


def test_finished_calls_do_not_keep_their_deadlines() -> None:
    from kombu_rpc._pending import PendingCalls

    pending = PendingCalls()
    try:
        for i in range(10_000):  # each call ends at once; its 30 s deadline is far away
            pending.add(str(i), "fib", 30.0)
            entry = pending.pop(str(i))
            assert entry is not None
            entry.resolve(i)
        assert len(pending) == 0
        assert len(pending._deadlines) <= 1025
    finally:
        pending.close()


def test_pending_calls_know_until_when_a_reply_may_come() -> None:
    """What a closed Redis proxy's reply list expires after (see RedisLink._discard)."""
    import math
    from time import monotonic

    from kombu_rpc._pending import PendingCalls

    pending = PendingCalls()
    try:
        assert pending.last_deadline() == -math.inf  # nothing sent: no reply can come
        before = monotonic()
        pending.add("a", "fib", 30.0)
        assert before + 30 <= pending.last_deadline() <= monotonic() + 30
        pending.add("b", "fib", None)
        assert pending.last_deadline() == math.inf  # a call in flight without a deadline
        for cid in ("a", "b"):
            entry = pending.pop(cid)
            assert entry is not None
            entry.resolve(1)
        assert pending.last_deadline() == -math.inf  # both answered
        expired = pending.add("c", "fib", 0.05)
        with pytest.raises(RPCTimeout):
            expired.result(timeout=10)
        # it timed out unanswered: its reply may still come, after its deadline
        assert before < pending.last_deadline() <= monotonic()
        pending.unanswered(monotonic() + 5)  # a broadcast gathered until then
        assert pending.last_deadline() > monotonic() + 4
    finally:
        pending.close()


def test_a_call_whose_request_failed_to_publish_may_still_be_answered() -> None:
    """A write cut short may have reached the broker: the reply queue must outlive the
    failed call (a Redis reply list deleted at once would be made again by its reply)."""
    import math
    from time import monotonic

    from kombu_rpc import protocol
    from kombu_rpc._pending import PendingCalls, _Outgoing

    pending = PendingCalls()
    try:
        job = _Outgoing(protocol.encode({}, "json"), "q", {}, {}, None, "a")
        future = pending.add("a", "fib", None, job=job)
        assert pending.last_deadline() == math.inf
        before = monotonic()
        job.fail(pending, kombu_rpc.ConnectionLostError("the write was cut"))
        with pytest.raises(kombu_rpc.ConnectionLostError):
            future.result(timeout=0)
        assert before <= pending.last_deadline() <= monotonic()
    finally:
        pending.close()


def test_pending_calls_count_the_calls_no_caller_comes_back_for() -> None:
    """What the link's thread reads for (a map's caller reads for its own calls), however
    a call ends: answered, expired, its reply lost, or failed at close."""
    from kombu_rpc import protocol
    from kombu_rpc._pending import PendingCalls, _Outgoing

    pending = PendingCalls()
    try:
        pending.add("plain", "fib", None)
        pending.add("answered", "fib", None, awaited=True)
        expiring = pending.add("expiring", "fib", 0.05, awaited=True)
        job = _Outgoing(protocol.encode({}, "json"), "q", {}, {}, None, "lost", written=True)
        pending.add("lost", "fib", None, job=job, awaited=True)
        pending.add("closed", "fib", None, awaited=True)
        assert (len(pending), pending.unawaited()) == (5, 1)
        entry = pending.pop("answered")
        assert entry is not None
        entry.resolve(1)
        with pytest.raises(RPCTimeout):
            expiring.result(timeout=10)
        assert (len(pending), pending.unawaited()) == (3, 1)
        assert pending.lose_replies() == []  # not retry: failed
        assert (len(pending), pending.unawaited()) == (2, 1)
        pending.fail_all(kombu_rpc.CallError, "closed")
        assert (len(pending), pending.unawaited()) == (0, 0)
        pending.add("again", "fib", None, awaited=True)
        assert (len(pending), pending.unawaited()) == (1, 0)
    finally:
        pending.close()


def test_servers_and_proxies_given_no_broker_use_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from kombu_rpc.connection import BROKER_URL_ENV
    from kombu_rpc.testing import make_registry, unique_queue_name

    monkeypatch.delenv(BROKER_URL_ENV, raising=False)
    with pytest.raises(ConfigurationError, match=f"no broker: .* or set {BROKER_URL_ENV}"):
        RPCProxy()
    with pytest.raises(ConfigurationError, match=BROKER_URL_ENV):
        RPCServer()
    monkeypatch.setenv(BROKER_URL_ENV, "memory://")
    queue = unique_queue_name()
    with RPCServer(registry=make_registry({"double": lambda x: 2 * x}), queue=queue).running():
        with RPCProxy(queue=queue, timeout=10) as proxy:
            assert proxy.double(21) == 42


@pytest.mark.parametrize("url", ["localhost:5672", "127.0.0.1", "guest:guest@localhost"])
def test_a_url_without_a_scheme_is_refused_with_how_to_write_it(url: str) -> None:
    with pytest.raises(ConfigurationError, match=f"has no scheme: write it as 'amqp://{url}//'"):
        RPCProxy(url)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:secret@127.0.0.1:6379/0", "redis://:**@127.0.0.1:6379/0"),
        ("amqp://user:secret@localhost:5672/vhost", "amqp://user:**@localhost:5672/vhost"),
        ("memory://", "memory://"),
        ("sqla+postgresql://user:secret@db/app", "sqla+postgresql://user:**@db/app"),
    ],
)
def test_urls_are_shown_as_written_with_the_password_masked(url: str, shown: str) -> None:
    from kombu_rpc.connection import connect, safe_uri

    if url.startswith("sqla") and importlib.util.find_spec("sqlalchemy") is None:
        pytest.skip("SQLAlchemy is not installed")
    assert safe_uri(connect(url)) == shown


def test_the_reference_documents_exactly_the_public_modules() -> None:
    """Internal modules start with ``_`` and have no reference page; every other
    module of the package has one (docs/reference)."""
    import pkgutil
    import re
    from pathlib import Path

    import kombu_rpc

    package = Path(kombu_rpc.__file__).parent
    public = {"kombu_rpc"} | {
        info.name
        for info in pkgutil.walk_packages([str(package)], "kombu_rpc.", onerror=lambda name: None)
        if not any(part.startswith("_") for part in info.name.split("."))
    }
    public.discard("kombu_rpc.contrib")  # a namespace for the integrations, nothing of its own
    reference = package.parent / "docs" / "reference"
    documented = {
        name
        for page in reference.glob("*.rst")
        for name in re.findall(r"^\.\. automodule:: (\S+)", page.read_text(), re.M)
    }
    assert documented == public
