"""Signed requests: servers with a secret run only requests signed with it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from kombu_rpc import ConfigurationError, RemoteError, RPCProxy, RPCServer, protocol

from ..conftest import Recorder
from .conftest import RawClient

SECRET = "correct horse battery staple"


def signed_headers(
    body: str, correlation_id: str, reply_to: str, *, secret: str = SECRET, signed_at: float | None = None
) -> dict[str, Any]:
    signed_at = time.time() if signed_at is None else signed_at
    text = protocol.signed_text(
        "request", body.encode(), "application/json", correlation_id, reply_to, None, signed_at
    )
    return {
        protocol.SIGNED_AT_HEADER: signed_at,
        protocol.SIGNATURE_HEADER: protocol.sign(secret.encode(), text),
    }


def test_signed_calls_and_casts_work(
    serve: Callable[..., RPCServer], proxies: Callable[..., RPCProxy], recorder: Recorder
) -> None:
    serve(secret=SECRET)
    proxy = proxies(secret=SECRET)
    assert proxy.math.add(2, 3) == 5
    proxy.record.cast("signed cast")
    assert recorder.wait(1) == ["signed cast"]


@pytest.mark.parametrize("secret", [None, "another secret of 16+ bytes"], ids=["unsigned", "wrong-secret"])
def test_unsigned_or_wrongly_signed_requests_are_refused_unrun(
    serve: Callable[..., RPCServer], proxies: Callable[..., RPCProxy], recorder: Recorder, secret: str | None
) -> None:
    serve(secret=SECRET)
    with pytest.raises(RemoteError) as info:
        proxies(secret=secret).record("x")
    assert info.value.exc_type == "InvalidSignature"
    assert recorder.calls == []
    assert proxies(secret=SECRET).echo(1) == 1


def test_tampered_replayed_and_stale_requests_are_refused(
    serve: Callable[..., RPCServer], raw: RawClient, recorder: Recorder
) -> None:
    serve(secret=SECRET)
    body = json.dumps({"method": "record", "args": ["once"]})

    def send(text: str, headers: dict[str, Any], correlation_id: str) -> dict[str, Any]:
        raw.send(text, headers=headers, properties={"correlation_id": correlation_id})
        return raw.reply(correlation_id)

    # a valid signed request runs once
    good = signed_headers(body, "cid-1", raw.reply_to)
    assert send(body, good, "cid-1") == {"result": None}
    # the same message again is a replay
    assert send(body, good, "cid-1")["error"]["message"].endswith("(a replay)")
    # a changed body under a valid signature is tampering
    tampered = json.dumps({"method": "record", "args": ["twice"]})
    assert (
        send(tampered, signed_headers(body, "cid-2", raw.reply_to), "cid-2")["error"]["type"]
        == "InvalidSignature"
    )
    # a signature from long ago is stale
    stale = signed_headers(body, "cid-3", raw.reply_to, signed_at=time.time() - 3600)
    assert send(body, stale, "cid-3")["error"]["type"] == "InvalidSignature"
    assert recorder.calls == ["once"]


@pytest.mark.parametrize("server_secret", [None, "the server's own secret"], ids=["unsigned", "wrong-secret"])
def test_a_proxy_with_a_secret_refuses_replies_not_signed_with_it(
    serve: Callable[..., RPCServer], proxies: Callable[..., RPCProxy], server_secret: str | None
) -> None:
    # A server without the secret (or with another) stands in for a forger that can
    # publish to the proxy's reply queue: its replies must not be taken as results.
    serve(secret=server_secret)
    with pytest.raises(RemoteError) as info:
        proxies(secret=SECRET).echo(1)
    assert info.value.exc_type == "InvalidSignature"
    assert "reply" in info.value.exc_message


def test_replies_of_a_server_with_a_secret_are_signed(
    serve: Callable[..., RPCServer], raw: RawClient
) -> None:
    serve(secret=SECRET)
    body = json.dumps({"method": "echo", "args": [5]})
    raw.send(
        body, headers=signed_headers(body, "cid-r", raw.reply_to), properties={"correlation_id": "cid-r"}
    )
    assert raw.reply("cid-r") == {"result": 5}
    message = raw.last_message
    protocol.check_signature(message, SECRET.encode(), 60, "reply")  # raises if unsigned or tampered


@pytest.mark.parametrize("secret", ["short", b"", 42])
def test_weak_or_invalid_secrets_are_refused(secret: Any) -> None:
    with pytest.raises(ConfigurationError, match="secret"):
        RPCProxy("memory://", secret=secret)
    with pytest.raises(ConfigurationError, match="secret"):
        RPCServer("memory://", secret=secret)


def test_the_async_proxy_signs_too(serve: Callable[..., RPCServer], broker_url: str, queue_name: str) -> None:
    import asyncio

    from kombu_rpc import AsyncRPCProxy

    serve(secret=SECRET)

    async def main() -> Any:
        async with AsyncRPCProxy(broker_url, queue=queue_name, timeout=10, secret=SECRET) as proxy:
            return await proxy.math.add(1, 2)

    assert asyncio.run(main()) == 3
