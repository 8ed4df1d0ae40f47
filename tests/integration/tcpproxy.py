"""A loopback TCP proxy for fault tests: forwards connections to a broker and can
sever them (RST) or stall them (stop moving bytes, keep the sockets open)."""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit


class TCPProxy:
    """Forward ``127.0.0.1:<port>`` to ``target``; use as a context manager.

    One thread serves every connection with a selector. While stalled, no byte moves
    in either direction and new connections wait unanswered, as on a network
    partition where packets are dropped; the peers see no error until their own
    timeouts or heartbeats fire.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._peers: dict[socket.socket, socket.socket] = {}
        self._lock = threading.Lock()
        self._stalled = threading.Event()
        self._stop = threading.Event()
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._selector.register(self._wakeup_r, selectors.EVENT_READ)
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)

    @classmethod
    def for_url(cls, url: str) -> TCPProxy:
        """A proxy in front of the broker of ``url``."""
        parts = urlsplit(url)
        assert parts.hostname in ("127.0.0.1", "localhost", "::1"), "only loopback targets"
        return cls(parts.hostname, parts.port or {"amqp": 5672, "redis": 6379}[parts.scheme])

    def url(self, url: str) -> str:
        """``url`` rewritten to go through this proxy."""
        parts = urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        new = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
        return urlunsplit(parts._replace(netloc=new))

    @property
    def connections(self) -> int:
        """Open proxied connections."""
        with self._lock:
            return len(self._peers) // 2

    def stall(self) -> None:
        """Stop forwarding in both directions; sockets stay open."""
        self._stalled.set()
        self._poke()

    def resume(self) -> None:
        """Forward again whatever was held back."""
        self._stalled.clear()
        self._poke()

    def sever(self) -> None:
        """Reset every proxied connection (new connections are still accepted)."""
        with self._lock:
            socks = list(self._peers)
            self._peers.clear()
        for sock in socks:
            self._unregister(sock)
            _reset(sock)

    def __enter__(self) -> TCPProxy:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self.resume()
        self._thread.join(10)
        self.sever()
        self._selector.close()
        for sock in (self._listener, self._wakeup_r, self._wakeup_w):
            sock.close()

    # -- the forwarding thread ---------------------------------------------------------

    def _poke(self) -> None:
        try:
            self._wakeup_w.send(b"x")
        except OSError:
            pass

    def _unregister(self, sock: socket.socket) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            stalled = self._stalled.is_set()
            for key, _ in self._selector.select(timeout=0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._wakeup_r:
                    sock.recv(4096)
                elif stalled:
                    continue
                elif sock is self._listener:
                    self._accept()
                else:
                    self._forward(sock)
            if stalled:  # nothing moves: wait for resume() instead of spinning
                self._stalled_wait()

    def _stalled_wait(self) -> None:
        while self._stalled.is_set() and not self._stop.is_set():
            self._stop.wait(0.05)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(self._target, timeout=5)
        except OSError:
            _reset(client)
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._peers[client] = upstream
            self._peers[upstream] = client
            self.accepted += 1
        self._selector.register(client, selectors.EVENT_READ)
        self._selector.register(upstream, selectors.EVENT_READ)

    def _forward(self, sock: socket.socket) -> None:
        with self._lock:
            peer = self._peers.get(sock)
        if peer is None:
            return
        try:
            data = sock.recv(65536)
            if data:
                peer.setblocking(True)
                peer.sendall(data)
                peer.setblocking(False)
                return
        except OSError:
            pass
        with self._lock:  # closed or failed: take down both sides
            self._peers.pop(sock, None)
            self._peers.pop(peer, None)
        for s in (sock, peer):
            self._unregister(s)
            _reset(s)


def _reset(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN, as a dropped connection looks."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
