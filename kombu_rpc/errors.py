"""The kombu_rpc exception hierarchy.

::

    RPCError                               root: ``except RPCError`` catches all of ours
    ├── ConfigurationError (+ValueError)   bad @remote use, duplicate name, bad option
    ├── SerializationError                 call arguments cannot be encoded
    ├── CallError                          this call did not complete
    │   ├── RPCTimeout (+TimeoutError)     no reply before the deadline
    │   ├── NoServerError                  AMQP: no queue of that name (nobody serves it)
    │   └── ConnectionLostError            broker unreachable past the retry policy
    └── RemoteError                        the server answered with a failure
        ├── MethodNotFound                 no function of that name is served
        ├── InvalidArguments               arguments do not fit the signature
        └── MalformedRequest               the server could not read the request

    TransportFallbackWarning (RuntimeWarning)  kombu's own transport is used instead of ours
"""

from __future__ import annotations

from typing import Any


class RPCError(Exception):
    """Root of every exception raised by kombu_rpc."""


class ConfigurationError(RPCError, ValueError):
    """Raised when the library is misused: bad names, options or broker URLs."""


class SerializationError(RPCError):
    """Raised when call arguments cannot be encoded with the chosen serializer."""


class CallError(RPCError):
    """Raised when a call did not complete; the remote function may not have run."""


class RPCTimeout(CallError, TimeoutError):
    """Raised when no reply arrives before the call's deadline.

    Args:
        method: Name of the remote function that was called.
        timeout: The timeout, in seconds, that passed.
    """

    def __init__(self, method: str, timeout: float) -> None:
        super().__init__(method, timeout)
        self.method = method
        self.timeout = timeout

    def __str__(self) -> str:
        return f"no reply to {self.method!r} within {self.timeout:g}s"


class IdleTimeout(RPCTimeout):
    """Raised when a call with an ``idle_timeout`` heard nothing (no item, progress,
    keepalive or reply) for that long: its server is gone or hung (see
    :doc:`/streaming`).

    Args:
        method: Name of the remote function that was called.
        timeout: The idle timeout, in seconds, that passed.
    """

    def __str__(self) -> str:
        return f"nothing heard about {self.method!r} for {self.timeout:g}s (idle_timeout)"


class NoServerError(CallError):
    """Raised at once when the broker cannot route a request: on AMQP, no queue of that
    name exists, so no server has ever consumed it. Needs publisher confirms (the
    default); other transports cannot tell, and such calls end in :class:`RPCTimeout`.
    """


class ConnectionLostError(CallError):
    """Raised when the broker cannot be reached, or the connection dropped mid-call."""


class RemoteError(RPCError):
    """Raised in the caller when the server answered a call with a failure.

    Args:
        exc_type: Name of the exception class raised on the server,
            for example ``"ValueError"``.
        exc_message: The exception's message.
        remote_traceback: The formatted server-side traceback, or ``""`` when the
            server does not send tracebacks.
    """

    def __init__(self, exc_type: str, exc_message: str, remote_traceback: str = "") -> None:
        super().__init__(exc_type, exc_message, remote_traceback)
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.exc_type}: {self.exc_message}" if self.exc_message else self.exc_type


class MethodNotFound(RemoteError):
    """Raised when the server exposes no function under the called name."""


class InvalidArguments(RemoteError):
    """Raised when the arguments do not fit the function's signature.

    The function was not run. ``exc_type`` is ``"TypeError"``.
    """


class MalformedRequest(RemoteError):
    """Raised when the server could not decode or validate the request message."""


#: Error kinds on the wire (see ``docs/protocol.md``) -> class raised in the caller.
ERROR_KINDS: dict[str, type[RemoteError]] = {
    "error": RemoteError,
    "method_not_found": MethodNotFound,
    "invalid_arguments": InvalidArguments,
    "malformed_request": MalformedRequest,
}


def remote_error_from_wire(error: Any) -> RemoteError:
    """Build the exception for an ``error`` mapping received in a reply."""
    if not isinstance(error, dict):
        return RemoteError("MalformedReply", f"reply error is not a mapping: {error!r}")
    cls = ERROR_KINDS.get(error.get("kind", "error"), RemoteError)
    return cls(
        str(error.get("type", "Exception")), str(error.get("message", "")), str(error.get("traceback", ""))
    )


class TransportFallbackWarning(RuntimeWarning):
    """kombu_rpc's own transport for a URL cannot run on the installed kombu or
    py-amqp, so kombu's stock transport is used (correct, only slower). Silence it
    with ``warnings.filterwarnings("ignore", category=TransportFallbackWarning)``."""
