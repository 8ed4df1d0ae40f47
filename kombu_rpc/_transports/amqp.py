"""kombu's py-amqp transport, reading the socket a chunk at a time (used for ``amqp://``
unless :func:`check` finds that py-amqp changed; see :mod:`kombu_rpc._transports`).

py-amqp reads every frame with three exact-size ``recv`` calls (header, payload, end
octet), each under a socket timeout it sets and restores, so a reply (three frames)
costs nine reads and six ``settimeout`` calls. :class:`Transport` is kombu's
``pyamqp`` transport whose plain-TCP connections read whatever the socket holds, up to
:data:`READ_SIZE` bytes, and cut frames out of that buffer; a frame already buffered is
handed over without touching the socket. TLS connections are left to py-amqp.

A whole frame waiting in the buffer is invisible to ``select()``: code that waits on
the socket asks :func:`kombu_rpc._transports.unread` first.
"""

from __future__ import annotations

import errno
import inspect
import select
import socket
from struct import pack, unpack_from
from typing import Any

from amqp import transport as amqp_transport
from amqp.exceptions import UnexpectedFrame
from kombu.transport import pyamqp

from . import unread

#: Most bytes one ``recv`` asks for.
READ_SIZE = 65536
#: The octet that ends every AMQP frame.
FRAME_END = 0xCE


class BufferedTCPTransport(amqp_transport.TCPTransport):  # type: ignore[misc]
    """py-amqp's TCP transport, with frames cut out of a read-ahead buffer.

    The unread bytes are ``_read_buffer[_pos:]``; the buffer keeps the start of a frame
    whose rest is still to come, so a read that times out loses nothing.
    """

    _read_buffer: bytes
    _pos = 0

    def _setup_transport(self) -> None:
        super()._setup_transport()
        self._pos = 0

    def take_frame(self) -> tuple[int, int, bytes] | None:
        """The next frame if it is wholly in the buffer, else ``None`` (no I/O)."""
        buf, pos = self._read_buffer, self._pos
        if len(buf) - pos < 7:
            return None
        frame_type, channel, size = unpack_from(">BHI", buf, pos)
        end = pos + size + 8
        if len(buf) < end:
            return None
        if buf[end - 1] != FRAME_END:
            self.connected = False
            raise UnexpectedFrame(f"Received frame_end {buf[end - 1]:#04x} while expecting 0xce")
        if end == len(buf):
            self._read_buffer, self._pos = b"", 0
        else:
            self._pos = end
        return frame_type, channel, buf[pos + 7 : end - 1]

    def frame_ready(self) -> bool:
        """True if a whole frame waits in the buffer."""
        buf, pos = self._read_buffer, self._pos
        return len(buf) - pos >= 7 and len(buf) - pos >= unpack_from(">I", buf, pos + 3)[0] + 8

    def read_frame(self, unpack: Any = None) -> tuple[int, int, bytes]:
        """Return the next frame, reading the socket (under its current timeout) until
        it is whole; ``socket.timeout`` leaves what was read in the buffer."""
        while True:
            frame = self.take_frame()
            if frame is not None:
                return frame
            self._fill()

    def _fill(self) -> None:
        """Read once from the socket into the buffer (at least one byte, or raise)."""
        buf, pos = self._read_buffer, self._pos
        if pos:
            buf, self._pos = buf[pos:], 0
            self._read_buffer = buf
        try:
            chunk = self._quick_recv(READ_SIZE)
        except TimeoutError:
            raise
        except OSError as exc:
            if exc.errno == errno.EINTR:
                return  # the caller reads again
            if exc.errno == errno.EAGAIN:  # a non-blocking socket (timeout 0) has nothing
                raise TimeoutError() from None
            if exc.errno not in amqp_transport._UNAVAIL:
                self.connected = False
            raise
        if not chunk:
            self.connected = False
            raise OSError("Server unexpectedly closed connection")
        self._read_buffer = buf + chunk

    def _read(self, n: int, initial: bool = False, _errnos: Any = None) -> bytes:
        """Exactly ``n`` bytes (py-amqp's interface, unused by :meth:`read_frame`)."""
        while len(self._read_buffer) - self._pos < n:
            self._fill()
        pos = self._pos
        self._pos = pos + n
        return bytes(self._read_buffer[pos : pos + n])


class Connection(pyamqp.Connection):  # type: ignore[misc]
    """kombu's py-amqp connection, on :class:`BufferedTCPTransport` unless TLS."""

    def Transport(
        self,
        host: str,
        connect_timeout: float | None,
        ssl: Any = False,
        read_timeout: float | None = None,
        write_timeout: float | None = None,
        socket_settings: Any = None,
        **kwargs: Any,
    ) -> Any:
        if ssl:
            return super().Transport(
                host, connect_timeout, ssl, read_timeout, write_timeout, socket_settings, **kwargs
            )
        return BufferedTCPTransport(
            host,
            connect_timeout=connect_timeout,
            ssl=ssl,
            read_timeout=read_timeout,
            write_timeout=write_timeout,
            socket_settings=socket_settings,
            **kwargs,
        )

    def drain_events(self, timeout: float | None = None) -> None:
        """Handle frames until a method is complete; with ``timeout=0`` (py-amqp's check
        for a ``connection.blocked`` notice before every publish) return at once, by
        raising ``socket.timeout``, when nothing has arrived."""
        if timeout == 0:
            transport = self.transport
            if not unread(self) and not select.select([transport.sock], [], [], 0)[0]:
                raise TimeoutError()
        super().drain_events(timeout)

    def blocking_read(self, timeout: float | None = None) -> Any:
        """Handle one frame: a buffered one at once, else read it under ``timeout``."""
        transport = self.transport
        take = getattr(transport, "take_frame", None)
        frame = take() if take is not None else None
        if frame is None:
            with transport.having_timeout(timeout):
                frame = transport.read_frame()
        return self.on_inbound_frame(frame)


class Transport(pyamqp.Transport):  # type: ignore[misc]
    """kombu's ``pyamqp`` transport with :class:`Connection`."""

    Connection = Connection


#: py-amqp's and kombu's names this module overrides or calls, by owner.
_RELIED_ON = {
    amqp_transport.TCPTransport: ("_setup_transport", "_read", "read_frame", "having_timeout"),
    pyamqp.Connection: ("Transport", "blocking_read", "on_inbound_frame", "drain_events"),
}
_TRANSPORT_PARAMS = ["self", "host", "connect_timeout", "ssl", "read_timeout", "write_timeout"]


def check() -> str | None:
    """``None`` if the py-amqp internals this module relies on are there and frames
    read through :class:`BufferedTCPTransport` come out whole; else what is wrong."""
    missing = [
        f"{owner.__module__}.{owner.__qualname__}.{name}"
        for owner, names in _RELIED_ON.items()
        for name in names
        if not hasattr(owner, name)
    ]
    if not isinstance(getattr(amqp_transport, "_UNAVAIL", None), (set, frozenset, tuple)):
        missing.append("amqp.transport._UNAVAIL")
    if missing:
        return f"missing {', '.join(missing)}"
    params = list(inspect.signature(pyamqp.Connection.Transport).parameters)
    if params[: len(_TRANSPORT_PARAMS)] != _TRANSPORT_PARAMS:
        return f"amqp.Connection.Transport takes {params}"
    return _check_reading()


def _check_reading() -> str | None:
    """Read two frames over a socket pair, the second arriving in two pieces."""
    frames = [(1, 1, b"first"), (3, 2, b"second frame")]
    wire = b"".join(
        pack(">BHI", kind, channel, len(body)) + body + bytes([FRAME_END]) for kind, channel, body in frames
    )
    ours, theirs = socket.socketpair()
    try:
        ours.settimeout(1.0)
        transport = BufferedTCPTransport.__new__(BufferedTCPTransport)
        transport.sock = ours
        transport._setup_transport()
        cut = len(wire) - 5
        theirs.sendall(wire[:cut])
        first = transport.read_frame()
        pending = transport.take_frame()
        theirs.sendall(wire[cut:])
        second = transport.read_frame()
    except Exception as exc:
        return f"reading frames failed: {type(exc).__name__}: {exc}"
    finally:
        ours.close()
        theirs.close()
    if [first, second] != frames or pending is not None:
        return f"frames read back as {[first, pending, second]}"
    return None
