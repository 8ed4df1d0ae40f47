"""A channel error while re-declaring after a lost connection, as after a RabbitMQ
cluster node died (404 NOT_FOUND, 405 RESOURCE_LOCKED): servers and proxies back off and
retry instead of dying, and lose no request. On RabbitMQ, with queues of the tests' own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu import Connection, Queue

from kombu_rpc import ConnectionLostError, RPCProxy, RPCServer
from kombu_rpc._links import amqp as link_module

pytestmark = pytest.mark.timeout(60)
AMQP_ONLY = True


@pytest.fixture
def admin(broker_url: str) -> Iterator[Connection]:
    with Connection(broker_url) as conn:
        yield conn


def test_a_server_retries_a_queue_it_cannot_declare_again_until_it_can(
    broker_url: str,
    serve: Callable[..., RPCServer],
    proxy: RPCProxy,
    queue_name: str,
    admin: Connection,
    log_waiter: Callable[[str], Any],
) -> None:
    server = serve()
    assert proxy.echo("before") == "before"
    refused = log_waiter("PRECONDITION_FAILED")
    # When its queue is deleted under it and made again with other arguments, the
    # server's consumer is cancelled and its re-declare is refused (a channel error)
    channel = admin.channel()
    channel.queue_delete(queue_name)
    Queue(queue_name, durable=True, channel=channel).declare()
    # Then it keeps trying (it used to raise out of run(), ending the process) ...
    assert refused.seen.wait(20), "the server did not try to declare its queue again"
    assert not server.ready
    # ... and serves again once the queue can be declared as it wants
    consuming = log_waiter(f"consuming {queue_name!r}")
    channel.queue_delete(queue_name)
    channel.close()
    assert consuming.seen.wait(20)
    assert proxy.echo("after") == "after"
    assert server.ready


def test_a_server_that_never_consumed_reports_a_conflicting_queue(
    broker_url: str, registry: Any, queue_name: str, admin: Connection
) -> None:
    channel = admin.channel()
    Queue(queue_name, durable=True, channel=channel).declare()
    try:
        server = RPCServer(broker_url, registry=registry, queue=queue_name)  # durable=False
        with pytest.raises(ConnectionLostError, match="PreconditionFailed"):
            with server.running():
                pass
    finally:
        channel.queue_delete(queue_name)
        channel.close()


def test_a_proxy_retries_its_reply_queue_and_sends_its_requests_again(
    serve: Callable[..., RPCServer],
    proxy: RPCProxy,
    admin: Connection,
    monkeypatch: pytest.MonkeyPatch,
    log_waiter: Callable[[str], Any],
) -> None:
    """After its connection dropped, the proxy's first attempts to open its channel
    again fail with a channel error (its reply queue still locked by the dead
    connection's record, on a cluster); requests not yet confirmed are sent again."""
    serve()
    assert proxy.echo("before") == "before"
    link = proxy._client._link
    assert isinstance(link, link_module.AmqpLink)
    real_open = link._open
    refusals = 2

    def open_refused_at_first() -> None:
        nonlocal refusals
        if refusals:
            refusals -= 1
            from amqp.exceptions import ResourceLocked

            raise ResourceLocked("RESOURCE_LOCKED - the dead connection's reply queue")
        real_open()

    monkeypatch.setattr(link, "_open", open_refused_at_first)
    recovered = log_waiter("the proxy reconnected")
    # When the connection drops (a reply queue dies with it, so calls in flight then
    # could only time out: the calls come after the cut)
    link._conn.connection.sock.shutdown(2)
    # Then the proxy gets through the refusals, and each call ends with its own result
    assert [proxy.echo(i) for i in range(5)] == list(range(5))
    assert recovered.seen.wait(20) and refusals == 0


def cut(proxy: RPCProxy) -> None:
    """Drop the proxy's own connection (nobody else's) as a dead broker node would."""
    link = proxy._client._link
    assert isinstance(link, link_module.AmqpLink)
    link._conn.connection.sock.shutdown(2)


@pytest.mark.parametrize("direct", [False, True], ids=["reply-queue", "direct-reply-to"])
def test_a_call_whose_reply_went_with_the_connection_fails_at_once(
    serve: Callable[..., RPCServer],
    proxies: Callable[..., RPCProxy],
    gate: Any,
    recorder: Any,
    direct: bool,
) -> None:
    serve(concurrency=2)
    proxy = proxies(timeout=30, direct_reply_to=direct)
    before = proxy.reply_queue
    call = proxy.held.call_async("in flight")
    gate.wait_entered()
    # When the proxy's connection drops while the server runs the call, the reply
    # queue is gone with it: the call fails at once, not at its 30 s timeout
    cut(proxy)
    with pytest.raises(ConnectionLostError, match="may have run"):
        call.result(10)
    gate.released.set()
    assert recorder.wait(1) == ["in flight"]  # it did run
    # And the proxy goes on under a new reply queue name (a dead node's record of the
    # old one may linger on a cluster)
    assert proxy.echo("after") == "after"
    assert (proxy.reply_queue != before) is not direct


def test_a_call_marked_retry_is_sent_again_when_its_reply_is_lost(
    serve: Callable[..., RPCServer], proxies: Callable[..., RPCProxy], gate: Any, recorder: Any
) -> None:
    serve(concurrency=2)
    proxy = proxies(timeout=30)
    call = proxy.options(retry=True).held.call_async("twice")
    gate.wait_entered()
    cut(proxy)
    gate.released.set()
    # The request was published again, to the new reply queue, and answered there
    assert call.result(20) == "twice"
    assert recorder.wait(2) == ["twice", "twice"]


def test_a_request_the_broker_keeps_refusing_is_sent_again_then_fails(
    proxies: Callable[..., RPCProxy],
    queue_name: str,
    admin: Connection,
    monkeypatch: pytest.MonkeyPatch,
    log_waiter: Callable[[str], Any],
) -> None:
    """A queue that takes no more messages nacks every publish, as a quorum queue
    without a leader does: the proxy publishes the request again, reconnects after
    NACK_LIMIT nacks in a row (the channel may be a broken one), and finally fails
    the call with a clear error, well before its timeout."""
    channel = admin.channel()
    Queue(
        queue_name, channel=channel, queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    ).declare()
    try:
        proxy = proxies(timeout=30)
        nacks: list[int] = []
        reconnected = log_waiter("the proxy reconnected")
        link = proxy._client._link
        assert isinstance(link, link_module.AmqpLink)
        real_on_nack = link._on_nack

        def counting(delivery_tag: int, multiple: bool) -> None:
            nacks.append(delivery_tag)
            real_on_nack(delivery_tag, multiple)

        monkeypatch.setattr(link, "_on_nack", counting)
        with pytest.raises(ConnectionLostError, match=r"refused the request .* 4 times"):
            proxy.echo("refused")
        assert len(nacks) == link_module.NACK_LIMIT + 1
        assert reconnected.seen.wait(10)
    finally:
        channel.queue_delete(queue_name)
        channel.close()


def test_a_server_notices_its_queue_vanished_without_a_cancel_and_declares_it_again(
    serve: Callable[..., RPCServer],
    proxy: RPCProxy,
    queue_name: str,
    admin: Connection,
    monkeypatch: pytest.MonkeyPatch,
    log_waiter: Callable[[str], Any],
) -> None:
    """On a cluster, the survivors of a dead node delete its queues moments after a
    server declared one again, and its consumer hears nothing: the server checks
    that its queues still exist, and declares them again if not."""
    import amqp.channel

    # No consumer-cancel notification reaches this process's consumers
    monkeypatch.setattr(amqp.channel.Channel, "_on_basic_cancel", lambda self, consumer_tag: None)
    server = serve()
    assert proxy.echo("before") == "before"
    lost = log_waiter("server lost its connection")
    consuming = log_waiter(f"consuming {queue_name!r}")
    admin.channel().queue_delete(queue_name)
    assert lost.seen.wait(40), "the server did not notice its queue was gone"
    assert consuming.seen.wait(20)
    assert server.ready
    assert proxy.echo("after") == "after"


def test_quorum_is_a_queue_type(
    serve: Callable[..., RPCServer], proxy: RPCProxy, queue_name: str, admin: Connection
) -> None:
    server = serve(queue_type="quorum", queue_arguments={"x-delivery-limit": 3})
    assert server.durable and server.queue_arguments == {"x-delivery-limit": 3, "x-queue-type": "quorum"}
    assert proxy.echo("q") == "q"
    # The broker has it as a quorum queue: declaring it as a classic one is refused
    from amqp.exceptions import PreconditionFailed

    with pytest.raises(PreconditionFailed):
        Queue(queue_name, durable=True, channel=admin.channel()).declare()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"queue_type": "stream"},
        {"queue_type": "quorum", "queue_arguments": {"x-queue-type": "classic"}},
        {"queue_arguments": [("x-queue-type", "quorum")]},
    ],
)
def test_bad_queue_types_are_refused(broker_url: str, kwargs: dict[str, Any]) -> None:
    from kombu_rpc import ConfigurationError

    with pytest.raises(ConfigurationError, match="queue_"):
        RPCServer(broker_url, **kwargs)


@pytest.mark.parametrize("retry", [False, True], ids=["plain", "retry"])
def test_a_map_goes_through_a_lost_connection(
    serve: Callable[..., RPCServer], proxies: Callable[..., RPCProxy], gate: Any, recorder: Any, retry: bool
) -> None:
    """A map's caller reads its calls' replies itself, but a lost connection is still
    the link thread's to mend: the calls whose replies went with it fail in their turn,
    at once, or are sent again with ``retry=True`` and answered."""
    serve(concurrency=2)
    proxy = proxies(timeout=30).options(retry=retry)
    got: list[Any] = []
    failed: list[BaseException] = []

    def iterate() -> None:
        try:
            got.extend(proxy.held.map(["a", "b"], window=2))
        except Exception as exc:
            failed.append(exc)

    mapping = threading.Thread(target=iterate)
    mapping.start()
    gate.wait_entered(2)
    cut(proxy)
    gate.released.set()
    mapping.join(20)
    assert not mapping.is_alive()
    if retry:
        assert (got, failed) == (["a", "b"], [])
        assert sorted(recorder.wait(4)) == ["a", "a", "b", "b"]  # run twice each
    else:
        assert got == []
        assert len(failed) == 1 and isinstance(failed[0], ConnectionLostError), failed
    assert proxy.echo("after") == "after"
