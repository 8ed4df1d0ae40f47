"""The wire envelope: request and reply bodies, header names, encoding (no I/O).

The format is described for humans in ``docs/protocol.md``; keep the two in step.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kombu.exceptions import ContentDisallowed, DecodeError, EncodeError
from kombu.message import Message
from kombu.serialization import dumps, registry

from .errors import (
    ERROR_KINDS,
    ConfigurationError,
    MalformedRequest,
    RemoteError,
    SerializationError,
    remote_error_from_wire,
)
from .topology import DIRECT_REPLY_TO

#: Valid remote names are dotted identifiers whose parts start with a letter (the
#: registry, the proxies and the codecs all check names against it).
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*")
#: Header holding the caller's deadline as seconds since the epoch (a float).
DEADLINE_HEADER = "x-rpc-deadline"
#: Header holding when the request was published, as seconds since the epoch (a float):
#: the server's queue-wait metric (:mod:`kombu_rpc.metrics`). Informational only.
SENT_AT_HEADER = "x-rpc-sent-at"
#: Seconds a signature stays valid, either way (for clock skew).
SIGNATURE_WINDOW = 60.0
#: Reply header naming the server that sent the reply.
SERVER_ID_HEADER = "x-rpc-server-id"
#: Header marking an internal wake-up message; its body is ignored.
CONTROL_HEADER = "x-rpc-control"
#: Headers of a signed request or reply: seconds since the epoch when it was signed,
#: and the hex HMAC-SHA256 of :func:`signed_text`.
SIGNED_AT_HEADER = "x-rpc-signed-at"
SIGNATURE_HEADER = "x-rpc-signature"
#: Request header asking for more than the one reply: a mapping with the optional keys
#: ``stream`` (a generator's items one message each), ``progress`` (progress messages)
#: and ``keepalive`` (seconds between keepalives while the call runs). See
#: :func:`read_wants`.
WANTS_HEADER = "x-rpc-wants"
#: Header of every message of a call other than its one plain reply: which part it is
#: (:data:`ITEM`, :data:`PROGRESS`, :data:`KEEPALIVE`), or :data:`END` on the final reply
#: of a stream.
PART_HEADER = "x-rpc-part"
#: Header with an item's sequence number (0, 1, ...), and on a stream's :data:`END` the
#: number of items sent before it.
SEQ_HEADER = "x-rpc-seq"
#: The values of :data:`PART_HEADER`.
ITEM, PROGRESS, KEEPALIVE, END = "item", "progress", "keepalive", "end"
#: Shortest and longest keepalive interval a request may ask for, in seconds.
MIN_KEEPALIVE, MAX_KEEPALIVE = 0.01, 3600.0


def check_serializer(name: str) -> str:
    """Return the content type of serializer ``name``.

    Raises:
        ConfigurationError: No serializer of that name is registered with kombu.
    """
    try:
        return str(registry.name_to_type[name])
    except KeyError:
        known = ", ".join(sorted(registry.name_to_type))
        raise ConfigurationError(f"unknown serializer {name!r}; registered: {known}") from None


def serializer_for(content_type: str | None, accept: frozenset[str]) -> str:
    """Pick the serializer to answer a message of ``content_type``: the same one if
    accepted (as kombu's ``send_reply`` does), else JSON."""
    name = registry.type_to_name.get(content_type or "")
    return name if name is not None and name in accept else "json"


@dataclass(frozen=True)
class Encoded:
    """A body encoded for publishing with ``Producer.publish``."""

    payload: bytes | str
    content_type: str
    content_encoding: str


#: The headers of an internal wake-up message.
WAKE_HEADERS = {CONTROL_HEADER: "wake"}
#: The :data:`CONTROL_HEADER` value of a cancel: the caller stopped waiting for the call
#: whose ``correlation_id`` the message carries (``docs/protocol.md``, "Cancel").
CANCEL = "cancel"
#: The (empty) body of an internal wake-up message, sent with :data:`WAKE_HEADERS`.
WAKE_UP = Encoded(b"", "application/data", "binary")


def wake_up_message() -> dict[str, Any]:
    """The keywords of ``Producer.publish`` for an internal wake-up message (its
    body, headers and content type; the caller adds where it goes)."""
    return {
        "body": WAKE_UP.payload,
        "headers": dict(WAKE_HEADERS),
        "content_type": WAKE_UP.content_type,
        "content_encoding": WAKE_UP.content_encoding,
    }


# -- JSON values ------------------------------------------------------------------
#
# kombu's JSON serializer (kombu.utils.json) writes datetime, date, time, Decimal, UUID
# and bytes as {"__type__": name, "__value__": text} and turns every object of exactly
# those two keys back into a value when decoding. kombu_rpc escapes the mappings that
# decoding would misread, so that every JSON value comes back as it was sent.

#: The content type of kombu's JSON serializer: the bodies that kombu_rpc escapes.
JSON_CONTENT_TYPE = "application/json"
#: The key of an escaped mapping: ``{ESCAPE_KEY: [[key, value], ...]}`` stands for the
#: mapping of those members (``docs/protocol.md``, "JSON values").
ESCAPE_KEY = "__kombu_rpc_dict__"
#: The keys of a typed value written by kombu's JSON serializer.
TYPED_VALUE_KEYS = frozenset({"__type__", "__value__"})
_ESCAPED_SHAPES = ("__type__", ESCAPE_KEY)
# A JSON text may spell any character of a key as an escape; ASCII ones are \u0020-\u007f.
_ESCAPED_ASCII = re.compile(r"\\u00[2-7]")
_ESCAPED_ASCII_BYTES = re.compile(rb"\\u00[2-7]")


def _may_spell(payload: object, keys: tuple[str, ...]) -> bool:
    """False when the JSON text ``payload`` surely holds none of ``keys``: a fast test
    that spares walking the bodies that need no escaping (nearly all). kombu reads a
    JSON body in bytes as UTF-8 whatever its ``content_encoding``."""
    if isinstance(payload, str):
        return any(key in payload for key in keys) or _ESCAPED_ASCII.search(payload) is not None
    if isinstance(payload, bytes):
        return (
            any(key.encode() in payload for key in keys) or _ESCAPED_ASCII_BYTES.search(payload) is not None
        )
    return True


def _needs_escape(mapping: dict[Any, Any]) -> bool:
    """True for a mapping that kombu's JSON decoding would turn into something else
    (a typed value), or that kombu_rpc's would take for an escape."""
    keys = mapping.keys()
    return keys == TYPED_VALUE_KEYS or keys == {ESCAPE_KEY}


def escape_json(value: Any) -> Any:
    """``value`` with every mapping shaped like a typed value (keys exactly
    ``__type__`` and ``__value__``) or like an escape (key exactly
    :data:`ESCAPE_KEY`) written as ``{ESCAPE_KEY: [[key, value], ...]}``, at any depth.

    Returns ``value`` itself when nothing needs escaping; never changes ``value``.
    """
    if isinstance(value, dict):
        items = [(key, escape_json(item)) for key, item in value.items()]
        if _needs_escape(value):
            return {ESCAPE_KEY: [[key, item] for key, item in items]}
        if all(new is old for (_, new), old in zip(items, value.values(), strict=True)):
            return value
        return dict(items)
    if isinstance(value, (list, tuple)):
        escaped = [escape_json(item) for item in value]
        return value if all(new is old for new, old in zip(escaped, value, strict=True)) else escaped
    return value


def unescape_json(value: Any) -> Any:
    """The inverse of :func:`escape_json`, on a decoded JSON body: every mapping whose
    only key is :data:`ESCAPE_KEY` becomes the mapping its pairs list.

    Returns ``value`` itself when nothing was escaped; never changes ``value``.

    Raises:
        ValueError: An escape does not hold a list of ``[string, value]`` pairs.
    """
    if isinstance(value, dict):
        if value.keys() == {ESCAPE_KEY}:
            pairs = value[ESCAPE_KEY]
            if not isinstance(pairs, list) or not all(
                isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) for pair in pairs
            ):
                raise ValueError(f"{ESCAPE_KEY} must hold a list of [string, value] pairs")
            return {key: unescape_json(item) for key, item in pairs}
        items = [(key, unescape_json(item)) for key, item in value.items()]
        if all(new is old for (_, new), old in zip(items, value.values(), strict=True)):
            return value
        return dict(items)
    if isinstance(value, list):
        restored = [unescape_json(item) for item in value]
        return value if all(new is old for new, old in zip(restored, value, strict=True)) else restored
    return value


def encode(body: Any, serializer: str) -> Encoded:
    """Serialize ``body``; a JSON body has its look-alike mappings escaped
    (:func:`escape_json`).

    Raises:
        SerializationError: ``body`` cannot be encoded with ``serializer``.
    """
    try:
        content_type, content_encoding, payload = dumps(body, serializer=serializer)
        if content_type == JSON_CONTENT_TYPE and _may_spell(payload, _ESCAPED_SHAPES):
            escaped = escape_json(body)
            if escaped is not body:
                content_type, content_encoding, payload = dumps(escaped, serializer=serializer)
    except (EncodeError, TypeError, ValueError, RecursionError) as exc:
        raise SerializationError(f"cannot encode with {serializer}: {exc}") from exc
    return Encoded(payload, content_type, content_encoding)


def decode(message: Message) -> Any:
    """The decoded body of ``message``; a JSON body has its escaped mappings restored
    (:func:`unescape_json`).

    Raises:
        kombu.exceptions.ContentDisallowed: The content type is not accepted.
        kombu.exceptions.DecodeError: The body cannot be decoded.
        ValueError: The body holds a malformed escape.
    """
    body = message.decode()
    if message.content_type == JSON_CONTENT_TYPE and _may_spell(message.body, (ESCAPE_KEY,)):
        body = unescape_json(body)
    return body


# -- requests ---------------------------------------------------------------------


def request_body(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The body of a request message."""
    return {"method": method, "args": list(args), "kwargs": kwargs}


def deadline_after(timeout: float | None) -> float | None:
    """The wall-clock deadline stamped on a request sent now with ``timeout``."""
    return None if timeout is None else time.time() + timeout


def queue_wait(headers: Mapping[str, Any] | None) -> float | None:
    """Seconds since a request was published, from its :data:`SENT_AT_HEADER`
    (``None`` without one); by two hosts' clocks, so it may be a little off."""
    sent = (headers or {}).get(SENT_AT_HEADER)
    if isinstance(sent, (int, float)) and not isinstance(sent, bool):
        return time.time() - sent
    return None


@dataclass(frozen=True)
class Request:
    """A request as read by the server."""

    method: str
    args: list[Any]
    kwargs: dict[str, Any]
    deadline: float | None

    def expired(self) -> bool:
        """True when the caller's deadline has passed."""
        return self.deadline is not None and time.time() > self.deadline


@dataclass(frozen=True)
class Wants:
    """What a request asks for besides its reply (its :data:`WANTS_HEADER`).

    Attributes:
        stream: Send a generator's items as they come, then an :data:`END`.
        progress: Send what the function reports with ``current_call().progress()``.
        keepalive: Seconds between keepalives while the call runs, or ``None``.
    """

    stream: bool = False
    progress: bool = False
    keepalive: float | None = None

    def header(self) -> dict[str, Any]:
        """The :data:`WANTS_HEADER` value that asks for this."""
        value: dict[str, Any] = {}
        if self.stream:
            value["stream"] = True
        if self.progress:
            value["progress"] = True
        if self.keepalive is not None:
            value["keepalive"] = self.keepalive
        return value


def read_wants(value: Any) -> Wants:
    """Check a request's :data:`WANTS_HEADER` value.

    Raises:
        MalformedRequest: It is not a mapping, ``stream`` or ``progress`` is not a
            bool, or ``keepalive`` is not a number of seconds between
            :data:`MIN_KEEPALIVE` and :data:`MAX_KEEPALIVE`.
    """
    if not isinstance(value, Mapping):
        raise MalformedRequest("MalformedRequest", f"{WANTS_HEADER} header must be a mapping")
    stream, progress = value.get("stream", False), value.get("progress", False)
    keepalive = value.get("keepalive")
    if not isinstance(stream, bool) or not isinstance(progress, bool):
        raise MalformedRequest("MalformedRequest", f"{WANTS_HEADER}: stream and progress must be booleans")
    if keepalive is not None and (
        isinstance(keepalive, bool)
        or not isinstance(keepalive, (int, float))
        or not MIN_KEEPALIVE <= keepalive <= MAX_KEEPALIVE
    ):
        raise MalformedRequest(
            "MalformedRequest",
            f"{WANTS_HEADER}: keepalive must be a number of seconds from {MIN_KEEPALIVE} to {MAX_KEEPALIVE}",
        )
    return Wants(stream, progress, None if keepalive is None else float(keepalive))


def keepalive_for(idle_timeout: float) -> float:
    """The keepalive interval a caller with ``idle_timeout`` asks for: a third of it, so
    that a lost keepalive is no idle timeout."""
    return min(MAX_KEEPALIVE, max(MIN_KEEPALIVE, idle_timeout / 3))


@dataclass(frozen=True)
class ReplyAddress:
    """Where a reply to a message goes; ``None`` from :func:`reply_address` for casts."""

    reply_to: str
    correlation_id: str


def reply_address(message: Message) -> ReplyAddress | None:
    """The reply address of ``message``, or ``None`` if it has no usable one."""
    props = message.properties or {}
    reply_to, correlation_id = props.get("reply_to"), props.get("correlation_id")
    if isinstance(reply_to, str) and reply_to and isinstance(correlation_id, str) and correlation_id:
        return ReplyAddress(reply_to, correlation_id)
    return None


_NOT_AN_ENVELOPE = (
    "body must be a mapping, got {}: this server speaks kombu_rpc's envelope, "
    '{{"method": "fib", "args": [30], "kwargs": {{}}}} (docs/protocol.md); a client that '
    "sends the bare argument as text, as the RabbitMQ tutorial's does, needs a server "
    'created with codec=Plain("<function name>")'
)


def parse_request(message: Message) -> Request:
    """Decode and validate a request message.

    Raises:
        MalformedRequest: The message cannot be decoded or is not a valid request.
    """
    try:
        body = decode(message)
    except ContentDisallowed as exc:
        raise MalformedRequest("ContentDisallowed", f"content type refused: {exc}") from None
    except (DecodeError, ValueError, TypeError, RecursionError) as exc:
        raise MalformedRequest("DecodeError", f"body could not be decoded: {exc}") from None
    if not isinstance(body, dict):
        raise MalformedRequest("MalformedRequest", _NOT_AN_ENVELOPE.format(type(body).__name__))
    method = body.get("method")
    args = body.get("args", [])
    kwargs = body.get("kwargs", {})
    if not isinstance(method, str) or not method:
        raise MalformedRequest("MalformedRequest", "'method' must be a non-empty string")
    if isinstance(args, tuple):
        args = list(args)
    if not isinstance(args, list):
        raise MalformedRequest("MalformedRequest", "'args' must be a list")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise MalformedRequest("MalformedRequest", "'kwargs' must be a mapping with string keys")
    return Request(method, args, kwargs, read_deadline(message))


def read_deadline(message: Message) -> float | None:
    """The deadline a request carries, if any.

    Raises:
        MalformedRequest: The deadline header is not a finite number.
    """
    deadline = (message.headers or {}).get(DEADLINE_HEADER)
    if deadline is None:
        return None
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not math.isfinite(deadline):
        raise MalformedRequest("MalformedRequest", f"{DEADLINE_HEADER} header must be a number")
    return float(deadline)


def cancel_headers(deadline: float | None) -> dict[str, Any]:
    """The headers of a cancel for a call with ``deadline`` (seconds since the epoch):
    servers remember the cancelled id until then."""
    headers: dict[str, Any] = {CONTROL_HEADER: CANCEL}
    if deadline is not None:
        headers[DEADLINE_HEADER] = deadline
    return headers


def read_cancel(message: Message) -> tuple[str, float | None] | None:
    """The call id and deadline a cancel message carries; ``None`` if ``message`` is
    no well-formed cancel."""
    headers = message.headers or {}
    call_id = (message.properties or {}).get("correlation_id")
    if headers.get(CONTROL_HEADER) != CANCEL or not isinstance(call_id, str) or not call_id:
        return None
    try:
        return call_id, read_deadline(message)
    except MalformedRequest:
        return None


# -- signing ----------------------------------------------------------------------


def secret_bytes(secret: str | bytes | None) -> bytes | None:
    """Check a signing secret; ``None`` means requests are not signed."""
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise ConfigurationError("secret must be str or bytes of at least 16 bytes (None: no signing)")
    return secret


def signed_text(
    kind: str,
    payload: bytes,
    content_type: str,
    correlation_id: str,
    reply_to: str,
    deadline: Any,
    signed_at: Any,
) -> bytes:
    """What a signature covers: what the message is (``"request"`` or ``"reply"``), its
    body and every property that routes it."""
    parts = (kind, signed_at, deadline, correlation_id, reply_to, content_type)
    return "\n".join(str(part) for part in parts).encode() + b"\n" + payload


def sign(secret: bytes, text: bytes) -> str:
    """The hex HMAC-SHA256 of ``text``."""
    return hmac.new(secret, text, hashlib.sha256).hexdigest()


def signature_headers(
    secret: bytes, kind: str, encoded: Encoded, correlation_id: str, reply_to: str, deadline: float | None
) -> dict[str, Any]:
    """The headers that sign a message about to be published, signed now."""
    payload = encoded.payload
    body = payload.encode(encoded.content_encoding) if isinstance(payload, str) else payload
    signed_at = time.time()
    text = signed_text(kind, body, encoded.content_type, correlation_id, reply_to, deadline, signed_at)
    return {SIGNED_AT_HEADER: signed_at, SIGNATURE_HEADER: sign(secret, text)}


def check_signature(message: Message, secret: bytes, window: float, kind: str = "request") -> None:
    """Verify the signature of a received ``kind`` message (``"request"`` or ``"reply"``)
    and that it was signed within ``window`` seconds.

    Raises:
        RemoteError: ``exc_type`` ``"InvalidSignature"`` (a :class:`MalformedRequest`
            for a request): unsigned, tampered with, or signed too long ago.
    """
    error = MalformedRequest if kind == "request" else RemoteError
    headers = message.headers or {}
    props = message.properties or {}
    signature, signed_at = headers.get(SIGNATURE_HEADER), headers.get(SIGNED_AT_HEADER)
    if (
        not isinstance(signature, str)
        or isinstance(signed_at, bool)
        or not isinstance(signed_at, (int, float))
    ):
        raise error("InvalidSignature", f"the {kind} is not signed, but a secret is set")
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    reply_to = props.get("reply_to") or ""
    if reply_to.startswith(DIRECT_REPLY_TO + "."):  # RabbitMQ rewrote the caller's reply_to
        reply_to = DIRECT_REPLY_TO
    text = signed_text(
        kind,
        body,
        message.content_type or "",
        props.get("correlation_id") or "",
        reply_to,
        headers.get(DEADLINE_HEADER),
        signed_at,
    )
    if not hmac.compare_digest(signature, sign(secret, text)):
        raise error("InvalidSignature", f"the {kind} signature does not match (wrong secret or tampered)")
    if not abs(time.time() - signed_at) <= window:
        raise error("InvalidSignature", f"the {kind} was signed more than {window:g}s ago or ahead")


# -- replies ----------------------------------------------------------------------

_KIND_OF = {cls: kind for kind, cls in ERROR_KINDS.items()}


def result_body(result: Any) -> dict[str, Any]:
    """The body of a successful reply."""
    return {"result": result}


def error_body(error: RemoteError | BaseException, send_traceback: bool = True) -> dict[str, Any]:
    """The body of a failure reply for ``error``.

    A :class:`RemoteError` subclass is sent as it is (its class picks the ``kind``);
    any other exception is an error raised by the remote function.
    """
    if isinstance(error, RemoteError):
        kind = _KIND_OF.get(type(error), "error")
        exc_type, message, tb = error.exc_type, error.exc_message, error.remote_traceback
    else:
        kind, exc_type, message = "error", type(error).__name__, str(error)
        tb = "".join(traceback.format_exception(error))
    return {
        "error": {
            "kind": kind,
            "type": exc_type,
            "message": message,
            "traceback": tb if send_traceback else "",
        }
    }


def item_body(item: Any) -> dict[str, Any]:
    """The body of a stream's item (:data:`ITEM`)."""
    return {"item": item}


def progress_body(value: Any) -> dict[str, Any]:
    """The body of a progress message (:data:`PROGRESS`)."""
    return {"progress": value}


#: The body of a keepalive (:data:`KEEPALIVE`).
KEEPALIVE_BODY: dict[str, Any] = {}


def part_headers(part: str, seq: int | None = None) -> dict[str, Any]:
    """The headers that mark a message as ``part`` of a call (with its sequence number)."""
    return {PART_HEADER: part} if seq is None else {PART_HEADER: part, SEQ_HEADER: seq}


def read_part(headers: Mapping[str, Any]) -> tuple[str, int | None]:
    """The part a message of a call is, and its sequence number (``None`` if it has
    none), from its headers.

    Raises:
        RemoteError: ``MalformedReply``: an unknown part, or an item or end without a
            sequence number (a non-negative integer).
    """
    part, seq = headers.get(PART_HEADER), headers.get(SEQ_HEADER)
    if part not in (ITEM, PROGRESS, KEEPALIVE, END):
        raise RemoteError("MalformedReply", f"unknown {PART_HEADER} {part!r:.50}")
    if part in (ITEM, END) and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 0):
        raise RemoteError("MalformedReply", f"a stream's {part} needs {SEQ_HEADER}, got {seq!r:.50}")
    return part, seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def parse_part(part: str, body: Any) -> Any:
    """The value a decoded item or progress body carries.

    Raises:
        RemoteError: ``MalformedReply``: the body is not ``{part: value}``.
    """
    if isinstance(body, dict) and part in body:
        return body[part]
    raise RemoteError("MalformedReply", f"{part} body has no {part!r}: {body!r:.200}")


def parse_reply(body: Any) -> Any:
    """Return the result carried by a decoded reply body, or raise its error.

    Raises:
        RemoteError: The reply reports a failure (or is itself malformed).
    """
    if isinstance(body, dict):
        if "error" in body:
            raise remote_error_from_wire(body["error"])
        if "result" in body:
            return body["result"]
    raise RemoteError("MalformedReply", f"reply body is not a result or an error: {body!r:.200}")
