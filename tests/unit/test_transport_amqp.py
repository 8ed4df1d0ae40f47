"""kombu_rpc._transports.amqp: frames cut out of a read-ahead buffer, over a socket pair."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from amqp.exceptions import UnexpectedFrame
from kombu import Connection

from kombu_rpc._transports import unread
from kombu_rpc._transports.amqp import BufferedTCPTransport, Transport
from kombu_rpc.connection import connect, safe_uri

pytestmark = pytest.mark.timeout(10)


def frame(payload: bytes, frame_type: int = 1, channel: int = 1, end: int = 0xCE) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + bytes([end])


class _Connection:
    """What :func:`unread` looks at: a py-amqp connection's ``transport``."""

    def __init__(self, transport: BufferedTCPTransport) -> None:
        self.transport = transport


@pytest.fixture
def pair() -> Iterator[tuple[BufferedTCPTransport, socket.socket]]:
    """A transport reading one end of a socket pair (1 s timeout), and the other end."""
    ours, theirs = socket.socketpair()
    ours.settimeout(1.0)
    transport = BufferedTCPTransport.__new__(BufferedTCPTransport)
    transport.sock = ours
    transport.connected = True
    transport._setup_transport()
    yield transport, theirs
    ours.close()
    theirs.close()


def test_frames_that_arrive_together_are_read_with_one_recv(
    pair: tuple[BufferedTCPTransport, socket.socket],
) -> None:
    transport, peer = pair
    peer.sendall(frame(b"one") + frame(b"two", frame_type=2, channel=3) + frame(b""))
    assert transport.read_frame() == (1, 1, b"one")
    # the rest is buffered: select() on the socket would not see it, unread() does
    assert unread(_Connection(transport))
    assert transport.take_frame() == (2, 3, b"two")
    assert transport.take_frame() == (1, 1, b"")
    assert transport.take_frame() is None
    assert not unread(_Connection(transport))


def test_a_frame_split_across_reads_is_put_together(pair: tuple[BufferedTCPTransport, socket.socket]) -> None:
    transport, peer = pair
    data = frame(b"x" * 300_000)  # larger than one read
    peer.sendall(data[:3])
    with pytest.raises(TimeoutError):
        transport.read_frame()  # half a header, then nothing: a timeout loses nothing
    assert transport.take_frame() is None and not unread(_Connection(transport))
    peer.sendall(data[3:100])
    with pytest.raises(TimeoutError):
        transport.read_frame()
    sender = threading.Thread(target=peer.sendall, args=(data[100:],))  # more than the socket buffers
    sender.start()
    assert transport.read_frame() == (1, 1, b"x" * 300_000)
    sender.join()


def test_a_non_blocking_read_of_nothing_is_a_timeout(
    pair: tuple[BufferedTCPTransport, socket.socket],
) -> None:
    transport, peer = pair
    transport.sock.settimeout(0)
    with pytest.raises(TimeoutError):
        transport.read_frame()
    peer.sendall(frame(b"late"))
    transport.sock.settimeout(1.0)
    assert transport.read_frame() == (1, 1, b"late")


def test_exact_reads_share_the_buffer(pair: tuple[BufferedTCPTransport, socket.socket]) -> None:
    transport, peer = pair
    peer.sendall(b"AMQP" + frame(b"after"))
    assert transport._read(4) == b"AMQP"
    assert transport.read_frame() == (1, 1, b"after")


def test_a_bad_frame_end_is_an_error(pair: tuple[BufferedTCPTransport, socket.socket]) -> None:
    transport, peer = pair
    peer.sendall(frame(b"bad", end=0x00))
    with pytest.raises(UnexpectedFrame):
        transport.read_frame()
    assert not transport.connected


def test_a_closed_connection_is_an_error(pair: tuple[BufferedTCPTransport, socket.socket]) -> None:
    transport, peer = pair
    peer.sendall(frame(b"last")[:5])
    peer.close()
    with pytest.raises(OSError, match="closed"):
        transport.read_frame()
    assert not transport.connected


@pytest.mark.parametrize(
    "url", ["amqp://guest:guest@127.0.0.1:5672//", "pyamqp://guest:guest@127.0.0.1:5672//"]
)
def test_amqp_urls_get_the_buffered_transport(url: str) -> None:
    assert connect(url).transport_cls is Transport
    assert connect(Connection(url, heartbeat=7)).heartbeat == 7  # options survive


def test_other_transports_are_left_alone() -> None:
    assert connect("rediss://127.0.0.1:6379/0").transport_cls == "rediss"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:secret@127.0.0.1:5672//", "amqp://guest:**@127.0.0.1:5672//"),
        ("memory://", "memory://"),
    ],
)
def test_urls_show_the_scheme_not_the_transport_class(url: str, shown: str) -> None:
    assert safe_uri(connect(url)).startswith(shown)
