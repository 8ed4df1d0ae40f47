"""kombu_rpc: remote procedure calls over any kombu transport (RabbitMQ, Redis, memory)."""

from .aio import AsyncRPCProxy
from .errors import (
    CallError,
    ConfigurationError,
    ConnectionLostError,
    InvalidArguments,
    MalformedRequest,
    MethodNotFound,
    NoServerError,
    RemoteError,
    RPCError,
    RPCTimeout,
    SerializationError,
)
from .proxy import MethodProxy, RPCProxy
from .registry import Registry, default_registry, remote
from .server import RPCServer

__version__ = "0.1.0"

__all__ = [
    # registering functions
    "remote",
    "Registry",
    "default_registry",
    # serving and calling
    "RPCServer",
    "RPCProxy",
    "MethodProxy",
    "AsyncRPCProxy",
    # errors
    "RPCError",
    "ConfigurationError",
    "SerializationError",
    "CallError",
    "RPCTimeout",
    "NoServerError",
    "ConnectionLostError",
    "RemoteError",
    "MethodNotFound",
    "InvalidArguments",
    "MalformedRequest",
]
