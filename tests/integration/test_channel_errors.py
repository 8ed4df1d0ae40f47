"""A channel error while re-declaring after a lost connection, as after a RabbitMQ
cluster node died (404 NOT_FOUND, 405 RESOURCE_LOCKED): servers and proxies back off and
retry instead of dying, and lose no request. On RabbitMQ, with queues of the tests' own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu import Connection, Queue

from kombu_rpc import ConnectionLostError, RPCProxy, RPCServer
from kombu_rpc import link as link_module

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
