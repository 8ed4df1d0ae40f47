"""The server's dispatcher: from a request message to its encoded reply, without I/O.

:class:`Dispatcher` decodes a request, verifies its signature (and that it is no
replay), looks its function up, checks the arguments (:meth:`Dispatcher.prepare`),
runs it and encodes the reply (:meth:`Dispatcher.run`). It touches no broker and
starts no thread: publishing the reply and settling the request are the consume
loop's (:mod:`kombu_rpc._consumer`), where to run a call is the execution policy's
(:mod:`kombu_rpc._execution`).

A request that is not to run comes out of :meth:`~Dispatcher.prepare` as a
:class:`Refused` exception, which says what becomes of the request and carries the
reply to send, if any.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Coroutine, Generator, Mapping
from contextlib import AbstractContextManager, closing, nullcontext
from time import monotonic
from typing import Any, Protocol, TypeAlias

from kombu.message import Message

from . import context, metrics, protocol
from ._cancels import CancelledCalls
from .codecs import Codec
from .errors import InvalidArguments, MalformedRequest, MethodNotFound, RemoteError, SerializationError
from .registry import RESERVED_PREFIX, Procedure, Registry

# The server's parts log as the server, as they did when they were one module.
logger = logging.getLogger("kombu_rpc.server")

#: A reply encoded for publishing: where it goes, its body, its headers.
Reply: TypeAlias = tuple[protocol.ReplyAddress, protocol.Encoded, dict[str, Any]]
#: A request ready to run (:meth:`Dispatcher.prepare`): the function, the request, its
#: call context, its reply address (``None`` for a cast), the reply's serializer, the
#: request's headers, and what it asks for besides its reply (``None``: nothing, as
#: nearly all calls).
Job: TypeAlias = tuple[
    Procedure,
    protocol.Request,
    context.CallContext,
    "protocol.ReplyAddress | None",
    str,
    "Mapping[str, Any] | None",
    "protocol.Wants | None",
]


class PartSink(Protocol):
    """Where the messages of a call other than its final reply go
    (:class:`kombu_rpc._replies.ReplyPublisher`)."""

    def publish_part(self, reply: Reply) -> None:
        """Publish an item or a progress message from the thread running the call.

        Raises:
            Exception: It could not be published.
        """

    def keep_alive(self, interval: float, make: Callable[[], Reply]) -> AbstractContextManager[None]:
        """Send the keepalive ``make()`` every ``interval`` seconds, from another thread,
        during the ``with`` block."""


class Disposal(enum.Enum):
    """What becomes of a request that is not run."""

    #: Not a valid request: rejected, never requeued.
    REJECT = "reject"
    #: Arrived after its deadline: acked, unanswered.
    ACK = "ack"
    #: Refused (no such function, wrong arguments): settled once its reply is sent,
    #: as a call that ran.
    SETTLE = "settle"


class Refused(Exception):
    """A request the dispatcher does not run.

    Args:
        disposal: What becomes of the request.
        reply: The error reply to send, if the request has a reply address.
    """

    def __init__(self, disposal: Disposal, reply: Reply | None) -> None:
        super().__init__(disposal.value)
        self.disposal = disposal
        self.reply = reply


class PartNotSent(Exception):
    """A call's item or progress message could not be published (the connection was
    lost): :meth:`Dispatcher.run` raises it instead of answering, and the request is
    requeued, as when a final reply could not be published."""


class _Parts:
    """How one call that needs more than one reply runs: a generator function (its
    items streamed, or returned as a list), or a call whose caller asked for progress
    or keepalives.

    The items are published, in order, by the thread that runs the call, the one that
    publishes its final reply; between two items it stops early once the call is
    cancelled (``cancelled`` on its :class:`~kombu_rpc.context.CallContext`) or past
    its deadline.
    """

    def __init__(self, dispatcher: Dispatcher, job: Job) -> None:
        procedure, request, call, address, serializer, _, wants = job
        self._dispatcher = dispatcher
        self._procedure = procedure
        self._request = request
        self._address = address
        self._serializer = serializer
        self._wants = wants or protocol.Wants()
        self._sink = dispatcher.parts
        #: Items published so far (a stream).
        self.sent = 0
        self._streaming = address is not None and self._wants.stream
        if address is not None and self._wants.progress:
            call = dataclasses.replace(call, _report=self._report)
        #: The call's context, with its progress reporter.
        self.call = call

    def _publish(self, part: str, body: dict[str, Any], seq: int | None = None) -> None:
        assert self._address is not None
        if self._sink is None:
            raise RuntimeError("this dispatcher has nowhere to send the parts of a call")
        reply = self._dispatcher.encode_part(self._address, part, body, self._serializer, seq)
        try:
            self._sink.publish_part(reply)
        except Exception as exc:
            raise PartNotSent(f"could not publish a {part} to {self._address.reply_to}: {exc}") from exc

    def _report(self, value: Any) -> None:
        self._publish(protocol.PROGRESS, protocol.progress_body(value))

    def keepalives(self) -> AbstractContextManager[None]:
        """Send keepalives meanwhile, if the caller asked for them."""
        interval, address, sink = self._wants.keepalive, self._address, self._sink
        if interval is None or address is None or sink is None:
            return nullcontext()

        def make() -> Reply:
            assert address is not None
            return self._dispatcher.encode_part(
                address, protocol.KEEPALIVE, protocol.KEEPALIVE_BODY, "json", None
            )

        return sink.keep_alive(interval, make)

    def run(self) -> Any:
        """Run the function: a stream returns ``None`` once its items are sent, a
        generator called plainly the list of its items, any other function its result."""
        procedure, request = self._procedure, self._request
        dispatcher = self._dispatcher
        result = procedure.func(*request.args, **request.kwargs)
        if procedure.is_coroutine:
            return dispatcher.run_coroutine(result)
        if isinstance(result, AsyncGenerator):
            items = self._async_items(result)
        elif isinstance(result, Generator):
            items = result
        else:
            return result
        collected: list[Any] = []
        with closing(items):
            for item in items:
                if self._streaming:
                    self._publish(protocol.ITEM, protocol.item_body(item), self.sent)
                    self.sent += 1
                else:
                    collected.append(item)
                if self._stopped():
                    break
        return None if self._streaming else collected

    def _async_items(self, agen: AsyncGenerator[Any, None]) -> Generator[Any, None, None]:
        """The items of an async generator, each produced on the dispatcher's loop;
        closing this closes it there."""
        run = self._dispatcher.run_coroutine
        try:
            while not self._stopped():
                try:
                    item = run(_anext(agen))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            run(agen.aclose())

    def _stopped(self) -> bool:
        """Whether the caller no longer waits: it cancelled the call, or its deadline
        passed (a stream whose cancel was lost stops all the same)."""
        return self.call.cancelled or self._request.expired()

    def end_headers(self) -> dict[str, Any] | None:
        """The headers of the final reply: a stream's end, with the items sent."""
        return protocol.part_headers(protocol.END, self.sent) if self._streaming else None


async def _anext(agen: AsyncGenerator[Any, None]) -> Any:
    return await agen.__anext__()


def _run_in_new_loop(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


class Dispatcher:
    """Turns request messages into encoded replies: decode, verify, look up, check
    arguments, run, encode. No broker, no threads.

    Args:
        registry: The functions served.
        codec: The wire format.
        server_id: The serving server's id (reply header, call context, ``ping``).
        queue: The request queue's name (logs, spans, ``ping``).
        accept: Serializers accepted for requests.
        send_tracebacks: Whether error replies carry the traceback.
        max_message_size: Largest request body decoded, in bytes; ``None``: any.
        secret: The signing key, or ``None`` for unsigned requests and replies.
        signature_window: Seconds a signed request stays valid, and a signature is
            remembered to detect a replay.
        run_coroutine: Runs an ``async def`` function's coroutine to its result
            (by default in a new event loop each time).
        cancels: The calls cancelled by their callers: never run, or not answered
            (by default a set of its own, which nothing fills).
    """

    def __init__(
        self,
        registry: Registry,
        codec: Codec,
        server_id: str,
        queue: str,
        accept: frozenset[str] = frozenset({"json"}),
        send_tracebacks: bool = True,
        max_message_size: int | None = None,
        secret: bytes | None = None,
        signature_window: float = protocol.SIGNATURE_WINDOW,
        run_coroutine: Callable[[Coroutine[Any, Any, Any]], Any] = _run_in_new_loop,
        cancels: CancelledCalls | None = None,
    ) -> None:
        self.registry = registry
        self.codec = codec
        self.server_id = server_id
        self.queue = queue
        self.accept = accept
        self.send_tracebacks = send_tracebacks
        self.max_message_size = max_message_size
        self.secret = secret
        self.signature_window = signature_window
        self.run_coroutine = run_coroutine
        self.cancels = CancelledCalls() if cancels is None else cancels
        self._cancelled = self.cancels.ids  # looked up for every call
        #: Where items, progress messages and keepalives go; set by the consume loop.
        self.parts: PartSink | None = None
        self._seen_signatures: OrderedDict[str, float] = OrderedDict()
        self.builtins = {
            p.name: p
            for p in (
                Procedure.of(f"{RESERVED_PREFIX}ping", self.ping),
                Procedure.of(f"{RESERVED_PREFIX}describe", self.describe),
            )
        }

    # -- before a call runs -----------------------------------------------------------

    def prepare(self, message: Message) -> Job:
        """Decode and check a request message: the call to run.

        Raises:
            Refused: The request is not to run (malformed, expired, or refused).
        """
        size = len(message.body or b"")
        if self.max_message_size is not None and size > self.max_message_size:
            raise self.malformed(
                message,
                MalformedRequest(
                    "MessageTooLarge",
                    f"request body of {size} bytes exceeds max_message_size={self.max_message_size}",
                ),
            )
        try:
            if self.secret is not None:
                self._check_signature(message, self.secret)
            request = self.codec.decode_request(message)
        except MalformedRequest as error:
            raise self.malformed(message, error) from None
        address = protocol.reply_address(message)
        headers = message.headers
        wants = None
        if headers and protocol.WANTS_HEADER in headers:
            try:
                wants = protocol.read_wants(headers[protocol.WANTS_HEADER])
            except MalformedRequest as error:
                raise self.malformed(message, error) from None
        call = context.received(
            headers,
            (message.properties or {}).get("correlation_id"),
            request.method,
            self.server_id,
            request.deadline,
            self.cancels,
        )
        if request.expired():
            logger.warning(
                "call %s: dropped a request for %r that arrived after its deadline",
                call.call_id,
                request.method,
            )
            self._count_refused(request.method)
            raise Refused(Disposal.ACK, None)
        serializer = protocol.serializer_for(message.content_type, self.accept)
        procedure = self.builtins.get(request.method) or self.registry.get(request.method)
        refusal: RemoteError | None = None
        if procedure is None:
            refusal = MethodNotFound("MethodNotFound", f"no remote function named {request.method!r}")
        else:
            try:
                procedure.check_arguments(request.args, request.kwargs)
            except TypeError as exc:
                refusal = InvalidArguments("TypeError", f"{request.method}(): {exc}")
            if refusal is None and wants is not None and wants.stream and not procedure.streams:
                refusal = RemoteError(
                    "NotAStream",
                    f"{request.method} is not a generator function: call it without .stream()",
                )
        if refusal is not None:
            logger.info("call %s: refused a call to %r: %s", call.call_id, request.method, refusal)
            self._count_refused(request.method)
            raise Refused(
                Disposal.SETTLE,
                None
                if address is None
                else self.encode_reply(
                    address, protocol.error_body(refusal, self.send_tracebacks), serializer
                ),
            )
        assert procedure is not None
        return procedure, request, call, address, serializer, headers, wants

    def malformed(self, message: Message, error: MalformedRequest) -> Refused:
        """The refusal of a message that is not a valid request (rejected, never
        requeued), answered in JSON if it has a reply address."""
        call_id = (message.properties or {}).get("correlation_id")
        logger.warning("call %s: rejected a malformed request on %r: %s", call_id or "-", self.queue, error)
        self._count_refused("")
        address = protocol.reply_address(message)
        reply = (
            None
            if address is None
            else self.encode_reply(address, protocol.error_body(error, self.send_tracebacks), "json")
        )
        return Refused(Disposal.REJECT, reply)

    def undecodable(self, message: Message, exc: Exception) -> Refused:
        """The refusal of a message kombu could not decode."""
        return self.malformed(message, MalformedRequest("DecodeError", f"body could not be decoded: {exc}"))

    def _count_refused(self, method: str) -> None:
        recorder = metrics.recorder
        if recorder is not None:  # a name nobody serves is no label: callers choose it
            served = method in self.builtins or self.registry.get(method) is not None
            recorder.server_call_refused(self.queue, method if served else "")

    def _check_signature(self, message: Message, secret: bytes) -> None:
        protocol.check_signature(message, secret, self.signature_window)
        signature = message.headers[protocol.SIGNATURE_HEADER]
        now = monotonic()
        seen = self._seen_signatures
        while seen and next(iter(seen.values())) < now:
            seen.popitem(last=False)
        if signature in seen and not (message.delivery_info or {}).get("redelivered"):
            raise MalformedRequest("InvalidSignature", "the request was already received (a replay)")
        seen[signature] = now + 2 * self.signature_window

    # -- running a call ---------------------------------------------------------------

    def run(self, job: Job) -> Reply | None:
        """Run the function as the current call; returns its reply, encoded for
        publishing (``None`` for a cast). Whatever the function raises is answered.

        A generator function's items are streamed when the request asks for it, else
        returned as a list; a request that asks for progress or keepalives gets them
        (:class:`_Parts`). A call its caller cancelled is not run if it was cancelled
        before it started, and not answered either way (``None``: its request is acked).

        Raises:
            PartNotSent: An item or progress message could not be published: the
                request is to be requeued, unanswered."""
        procedure, request, call, address, serializer, headers, wants = job
        cancelled = self._cancelled
        if call.call_id in cancelled:
            logger.info(
                "call %s: dropped a request for %r cancelled before it ran", call.call_id, request.method
            )
            return None
        parts = _Parts(self, job) if wants is not None or procedure.streams else None
        recorder = metrics.recorder
        if recorder is not None:
            recorder.server_call_started(self.queue)
            queue_wait = protocol.queue_wait(headers)
        started = monotonic()
        end: dict[str, Any] | None = None  # the headers of a stream's end
        not_sent: PartNotSent | None = None
        if parts is not None:
            call = parts.call
        with context.server_span(call, self.queue, headers) as span:
            try:
                if parts is None:
                    result = procedure.func(*request.args, **request.kwargs)
                    if procedure.is_coroutine:  # runs in a copy of this context: current_call() works
                        result = self.run_coroutine(result)
                else:
                    with parts.keepalives():
                        try:
                            result = parts.run()
                        finally:
                            end = parts.end_headers()
                body = protocol.result_body(result)
                outcome = "ok"
            except PartNotSent as exc:  # not the function's failure: no answer, run again
                context.record_error(span, exc)
                not_sent = exc
                outcome = type(exc).__name__
                logger.warning("call %s: %s; its request is requeued", call.call_id, exc)
            except BaseException as exc:  # SystemExit too must be answered
                context.record_error(span, exc)
                body = protocol.error_body(exc, self.send_tracebacks)
                outcome = type(exc).__name__
                what = "cast" if address is None else "call"
                if isinstance(exc, procedure.expected) or call.call_id in cancelled:
                    logger.info(
                        "call %s: %s %s raised %s: %s", call.call_id, what, request.method, outcome, exc
                    )
                else:
                    logger.error("call %s: %s %s failed", call.call_id, what, request.method, exc_info=exc)
        if recorder is not None:
            recorder.server_call_ended(
                self.queue,
                request.method,
                "ok" if outcome == "ok" else "error",
                monotonic() - started,
                queue_wait,
            )
        logger.debug(
            "call %s %s%s -> %s in %.1f ms",
            call.call_id,
            request.method,
            "" if address else " (cast)",
            outcome,
            (monotonic() - started) * 1000,
        )
        if not_sent is not None:
            raise not_sent
        if address is None:
            return None
        if call.call_id in cancelled:  # the caller no longer waits
            logger.info("call %s: %s ended after its caller cancelled it", call.call_id, request.method)
            return None
        return self.encode_reply(address, body, serializer, end)

    def encode_reply(
        self,
        address: protocol.ReplyAddress,
        body: dict[str, Any],
        serializer: str,
        extra_headers: dict[str, Any] | None = None,
    ) -> Reply:
        """Encode a reply body (``{"result": ...}`` or ``{"error": ...}``) for
        ``address``: an unserializable result becomes an ``UnserializableResult``
        error; the reply names this server and is signed if there is a secret.
        ``extra_headers`` (a stream's end) are added."""
        try:
            encoded, headers = self.codec.encode_reply(body, serializer)
        except SerializationError as exc:
            unserializable = RemoteError("UnserializableResult", f"the result cannot be serialized: {exc}")
            encoded, headers = self.codec.encode_reply(protocol.error_body(unserializable), serializer)
        return self._sent_by_this_server(address, encoded, {**headers, **(extra_headers or {})})

    def encode_part(
        self,
        address: protocol.ReplyAddress,
        part: str,
        body: dict[str, Any],
        serializer: str,
        seq: int | None,
    ) -> Reply:
        """Encode a message of a call other than its final reply (an item, progress or a
        keepalive), named and signed as a reply.

        Raises:
            SerializationError: ``body`` cannot be encoded.
        """
        encoded = protocol.encode(body, serializer)
        return self._sent_by_this_server(address, encoded, protocol.part_headers(part, seq))

    def _sent_by_this_server(
        self, address: protocol.ReplyAddress, encoded: protocol.Encoded, headers: dict[str, Any]
    ) -> Reply:
        """A message to ``address`` naming this server, signed as a reply if there is
        a secret."""
        headers = {**headers, protocol.SERVER_ID_HEADER: self.server_id}
        if self.secret is not None:
            headers.update(
                protocol.signature_headers(self.secret, "reply", encoded, address.correlation_id, "", None)
            )
        return address, encoded, headers

    # -- built-in methods -------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        """Identify this server."""
        return {
            "server_id": self.server_id,
            "queue": self.queue,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
        }

    def describe(self) -> list[dict[str, str]]:
        """List the methods this server exposes."""
        return [p.describe() for p in [*self.registry, *self.builtins.values()]]
