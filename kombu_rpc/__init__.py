"""kombu_rpc: remote procedure calls over any kombu transport (RabbitMQ, Redis, memory).

The package opts out of pytest's assertion rewriting (PYTEST_DONT_REWRITE): its pytest
plugin is loaded through an entry point, and pytest would otherwise warn when a test
session starts an inner pytest run (pytester) after kombu_rpc was imported.
"""

from ._client import BroadcastReply
from .aio import AsyncRPCProxy, AsyncStream
from .codecs import Codec, Envelope, Plain
from .context import CallContext, CallIdFilter, current_call
from .errors import (
    CallError,
    ConfigurationError,
    ConnectionLostError,
    IdleTimeout,
    InvalidArguments,
    MalformedRequest,
    MethodNotFound,
    NoServerError,
    RemoteError,
    RPCError,
    RPCTimeout,
    SerializationError,
)
from .events import Event, EventPublisher
from .interfaces import call_async, call_map
from .proxy import MethodProxy, RPCProxy, Stream
from .registry import Registry, default_registry, remote, subscribe
from .server import RPCServer

__version__ = "0.1.0"

__all__ = [
    # registering functions
    "remote",
    "Registry",
    "default_registry",
    # events
    "subscribe",
    "EventPublisher",
    "Event",
    # serving and calling
    "RPCServer",
    "RPCProxy",
    "MethodProxy",
    "AsyncRPCProxy",
    "BroadcastReply",
    "call_async",
    "call_map",
    # streamed results
    "Stream",
    "AsyncStream",
    # call context
    "current_call",
    "CallContext",
    "CallIdFilter",
    # wire formats
    "Codec",
    "Envelope",
    "Plain",
    # errors
    "RPCError",
    "ConfigurationError",
    "SerializationError",
    "CallError",
    "RPCTimeout",
    "IdleTimeout",
    "NoServerError",
    "ConnectionLostError",
    "RemoteError",
    "MethodNotFound",
    "InvalidArguments",
    "MalformedRequest",
]
