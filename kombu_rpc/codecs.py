"""Wire formats: how requests and replies are laid out in message bodies.

:class:`Envelope`, the default, is kombu_rpc's own format (``docs/protocol.md``): a
mapping naming the method and its arguments, and a reply carrying a result or an error.
:class:`Plain` is the format of the RabbitMQ tutorial 6 programs, whose request body is
the bare argument as text and whose reply body is the bare result as text, so that
kombu_rpc servers and proxies can talk to those programs unchanged.

A server and its callers must use the same codec. Both sides' other behaviour
(``reply_to``, ``correlation_id``, deadlines, signing, acknowledgements) is the same
with every codec.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from kombu.message import Message

from . import protocol
from .errors import (
    ConfigurationError,
    MalformedRequest,
    RemoteError,
    SerializationError,
    remote_error_from_wire,
)


class Codec(ABC):
    """Encodes and decodes the bodies of requests and replies."""

    @abstractmethod
    def encode_request(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], serializer: str
    ) -> protocol.Encoded:
        """The body of a request (caller side).

        Raises:
            SerializationError: The call cannot be expressed in this format.
        """

    @abstractmethod
    def decode_request(self, message: Message) -> protocol.Request:
        """Read a request (server side).

        Raises:
            MalformedRequest: The message is not a valid request.
        """

    @abstractmethod
    def encode_reply(self, body: dict[str, Any], serializer: str) -> tuple[protocol.Encoded, dict[str, Any]]:
        """The body and headers of a reply, given its envelope (``{"result": ...}`` or
        ``{"error": {...}}``, see :func:`~kombu_rpc.protocol.error_body`).

        Raises:
            SerializationError: The result cannot be encoded.
        """

    @abstractmethod
    def decode_reply(self, message: Message) -> Any:
        """The result a reply carries (caller side).

        Raises:
            RemoteError: The reply reports a failure, or cannot be read.
        """


def check_codec(codec: object) -> Codec:
    """Return ``codec``, or :class:`Envelope` for ``None``.

    Raises:
        ConfigurationError: ``codec`` is not a :class:`Codec`.
    """
    if codec is None:
        return Envelope()
    if not isinstance(codec, Codec):
        raise ConfigurationError(f"codec must be a kombu_rpc.codecs.Codec or None, got {codec!r}")
    return codec


class Envelope(Codec):
    """kombu_rpc's own format, encoded with the caller's serializer (the default).

    With JSON, arguments and results are JSON values plus the types kombu's JSON
    serializer writes as typed values (``datetime``, ``date``, ``time``, ``Decimal``,
    ``UUID``, ``bytes``); mappings that would read as a typed value are escaped, so every
    value comes back as it was sent (``docs/protocol.md``, "JSON values").
    """

    def encode_request(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], serializer: str
    ) -> protocol.Encoded:
        return protocol.encode(protocol.request_body(method, args, kwargs), serializer)

    def decode_request(self, message: Message) -> protocol.Request:
        return protocol.parse_request(message)

    def encode_reply(self, body: dict[str, Any], serializer: str) -> tuple[protocol.Encoded, dict[str, Any]]:
        return protocol.encode(body, serializer), {}

    def decode_reply(self, message: Message) -> Any:
        return protocol.parse_reply(protocol.decode(message))


#: Header of a :class:`Plain` reply reporting a failure: the ``error`` mapping of
#: :func:`~kombu_rpc.protocol.error_body`. Its body is the error message as text.
PLAIN_ERROR_HEADER = "x-rpc-error"


def parse_text(text: str) -> Any:
    """:class:`Plain`'s default reading of a body: JSON when it is JSON (``"30"`` is
    ``30``), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_value(value: Any) -> str:
    """:class:`Plain`'s default writing of a value: a string as it is, anything else as
    JSON (``832040`` is ``"832040"``, as the tutorial's ``str(response)``)."""
    return value if isinstance(value, str) else json.dumps(value)


class Plain(Codec):
    """The RabbitMQ tutorial 6 format: one argument in, one result out, both as text.

    A request body is the argument as UTF-8 text (``"30"``), with no method name: a
    server with this codec runs ``method`` for every request of its queue. A reply
    body is the result as text (``"832040"``). A failure is answered with its message
    as the body and the error in the ``x-rpc-error`` header, which the tutorial's
    programs ignore.

    Args:
        method: The remote function a server runs for every request (server side
            only; proxies ignore it).
        parse: Turns a received body's text into the argument or result; by default
            JSON when it parses as JSON, else the text (:func:`parse_text`).
        format: Turns the argument or the result into text; by default strings as they
            are and anything else as JSON (:func:`format_value`).

    Example:
        >>> server = RPCServer(url, queue="rpc_queue", codec=Plain("fib"))  # doctest: +SKIP
        >>> proxy = RPCProxy(url, queue="rpc_queue", codec=Plain())  # doctest: +SKIP
        >>> proxy.fib(30)  # doctest: +SKIP
        832040
    """

    def __init__(
        self,
        method: str | None = None,
        parse: Callable[[str], Any] = parse_text,
        format: Callable[[Any], str] = format_value,
    ) -> None:
        if method is not None and not (isinstance(method, str) and protocol.NAME_PATTERN.fullmatch(method)):
            raise ConfigurationError(f"Plain(method=...) must be a remote name, got {method!r}")
        self.method = method
        self._parse = parse
        self._format = format

    def _text(self, value: Any) -> protocol.Encoded:
        try:
            text = self._format(value)
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"cannot write {value!r:.100} as text: {exc}") from exc
        if not isinstance(text, str):
            raise SerializationError(f"format must return str, got {type(text).__name__}")
        return protocol.Encoded(text.encode(), "text/plain", "utf-8")

    def encode_request(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], serializer: str
    ) -> protocol.Encoded:
        if len(args) != 1 or kwargs:
            raise SerializationError("the plain format carries exactly one positional argument")
        return self._text(args[0])

    def decode_request(self, message: Message) -> protocol.Request:
        if self.method is None:
            raise MalformedRequest("MalformedRequest", "this server's Plain codec names no method")
        argument = self._parse(_body_text(message, MalformedRequest))
        return protocol.Request(self.method, [argument], {}, protocol.read_deadline(message))

    def encode_reply(self, body: dict[str, Any], serializer: str) -> tuple[protocol.Encoded, dict[str, Any]]:
        if "error" in body:
            error = body["error"]
            return protocol.Encoded(str(error["message"]).encode(), "text/plain", "utf-8"), {
                PLAIN_ERROR_HEADER: error
            }
        return self._text(body["result"]), {}

    def decode_reply(self, message: Message) -> Any:
        error = (message.headers or {}).get(PLAIN_ERROR_HEADER)
        if error is not None:
            raise remote_error_from_wire(error)
        if message.content_type == protocol.JSON_CONTENT_TYPE:
            # kombu_rpc's envelope: a server without Plain, refusing the plain request
            return protocol.parse_reply(protocol.decode(message))
        return self._parse(_body_text(message, RemoteError))


def _body_text(message: Message, error: type[RemoteError]) -> str:
    body = message.body
    try:
        return body.decode() if isinstance(body, bytes) else str(body)
    except UnicodeDecodeError as exc:
        kind = "MalformedRequest" if error is MalformedRequest else "MalformedReply"
        raise error(kind, f"the plain body is not UTF-8 text: {exc}") from None
