"""Call context: which call a remote function is serving, and the calls that led to it.

Every request carries its call id and the ids of its parent calls (the calls being
served, in the process that made it, when it was made), plus a W3C ``traceparent``
when one is set. A server exposes the context of the call it runs through
:func:`current_call`; a proxy used inside a remote function sends the chain on, one
level deeper. With ``opentelemetry-api`` installed
(``pip install 'opentelemetry-api>=1.20'``, or ``pip install -e '.[otel]'`` in a
kombu_rpc checkout), calls are also traced once a tracer provider is configured: a
client span per call on the caller's side and a server span around the function, linked
through ``traceparent``. Otherwise nothing is traced, and a received ``traceparent``
is passed on unchanged.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._cancels import CancelledCalls

try:
    from opentelemetry import propagate, trace
except ImportError:  # an optional extra
    propagate = trace = None  # type: ignore[assignment]
    _tracer: Any = None
else:
    _tracer = trace.get_tracer(__name__)  # follows the tracer provider set later

#: Header with the id of the call (the request's ``correlation_id``).
CALL_ID_HEADER = "x-rpc-call-id"
#: Header with the ids of the parent calls, outermost first (a list of strings).
PARENTS_HEADER = "x-rpc-parents"
#: The W3C trace context headers, as OpenTelemetry writes them.
TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"
#: Longest parent chain kept: a deeper one loses its outermost ids.
MAX_PARENTS = 32

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_ID = re.compile(r"[\w.:-]{1,128}", re.ASCII)


@dataclass(frozen=True)
class CallContext:
    """The call a remote function is running for, as :func:`current_call` returns it.

    Attributes:
        call_id: This call's id, the request's ``correlation_id`` (shared by the
            servers of one broadcast).
        method: The remote name that was called.
        parents: Ids of the calls that led to this one, outermost first; empty for a
            call made outside any remote function.
        server_id: The serving :class:`~kombu_rpc.server.RPCServer`'s id.
        deadline: The caller's deadline in seconds since the epoch, or ``None``.
        traceparent: The W3C trace context the request carried, if any.
    """

    call_id: str
    method: str
    parents: tuple[str, ...] = ()
    server_id: str = ""
    deadline: float | None = None
    traceparent: str | None = None
    #: The serving server's cancelled calls (``None`` outside a server).
    _cancels: CancelledCalls | None = field(default=None, repr=False, compare=False)
    #: Sends a progress message to the caller; ``None`` when the caller asked for none.
    _report: Callable[[Any], None] | None = field(default=None, repr=False, compare=False)

    def progress(self, value: Any) -> None:
        """Report progress to the caller: ``value`` (any value the call's serializer
        encodes, such as a fraction done or a mapping) reaches the caller's
        ``on_progress`` callback (see :doc:`/streaming`). Does nothing when the caller
        asked for no progress, and for a cast.

        Raises:
            SerializationError: ``value`` cannot be encoded.
        """
        if self._report is not None:
            self._report(value)

    @property
    def chain(self) -> tuple[str, ...]:
        """The parents and this call: what a call made from here sends as parents."""
        return (*self.parents, self.call_id)[-MAX_PARENTS:]

    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled this call (see :doc:`/cancellation`).

        A sync function that runs long checks it now and then, and stops early: what
        it returns (or raises) then is not sent, since the caller no longer waits.
        An ``async def`` function need not: its task is cancelled.
        """
        cancels = self._cancels
        return cancels is not None and self.call_id in cancels.ids

    def wait_cancelled(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (``None``: no limit) until the caller
        cancels this call; returns :attr:`cancelled`. A sync function that waits for
        something else in steps can wait here instead of sleeping between them.

        Raises:
            ValueError: ``timeout`` is negative.
        """
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be None or >= 0, got {timeout!r}")
        cancels = self._cancels
        if cancels is None:  # not served by a server: never cancelled
            if timeout is None:
                raise ValueError("this call cannot be cancelled: waiting without a timeout never ends")
            threading.Event().wait(timeout)
            return False
        return cancels.wait(self.call_id, timeout)


_current: ContextVar[CallContext | None] = ContextVar("kombu_rpc_current_call", default=None)


def current_call() -> CallContext | None:
    """The context of the call being served, inside a remote function; else ``None``."""
    return _current.get()


def received(
    headers: Mapping[str, Any] | None,
    correlation_id: str | None,
    method: str,
    server_id: str,
    deadline: Any,
    cancels: CancelledCalls | None = None,
) -> CallContext:
    """The context of a received request, whose :attr:`~CallContext.cancelled` reads
    ``cancels``. Malformed context headers are ignored, never refused: they only
    describe the call."""
    headers = headers or {}
    call_id = headers.get(CALL_ID_HEADER)
    if not (isinstance(call_id, str) and _ID.fullmatch(call_id)):
        call_id = correlation_id if isinstance(correlation_id, str) else ""
    parents = headers.get(PARENTS_HEADER)
    if not (
        isinstance(parents, (list, tuple)) and all(isinstance(p, str) and _ID.fullmatch(p) for p in parents)
    ):
        parents = ()
    traceparent = headers.get(TRACEPARENT_HEADER)
    if not (isinstance(traceparent, str) and _TRACEPARENT.fullmatch(traceparent)):
        traceparent = None
    return CallContext(
        call_id, method, tuple(parents)[-MAX_PARENTS:], server_id, deadline, traceparent, cancels
    )


def outgoing_headers(call_id: str) -> dict[str, Any]:
    """The context headers of a request about to be sent (inside a client span, if any)."""
    headers: dict[str, Any] = {CALL_ID_HEADER: call_id}
    parent = _current.get()
    if parent is not None:
        headers[PARENTS_HEADER] = list(parent.chain)
    if tracing():
        propagate.inject(headers)
    if TRACEPARENT_HEADER not in headers and parent is not None and parent.traceparent is not None:
        headers[TRACEPARENT_HEADER] = parent.traceparent  # not tracing here: pass it on
    return headers


# -- OpenTelemetry --------------------------------------------------------------------


def tracing() -> bool:
    """True when OpenTelemetry is installed and a tracer provider is set (before that,
    every span would be a no-op: kombu_rpc skips them).

    Checked on every call, so it reads the API's global directly: asking
    ``get_tracer_provider()`` costs an environment lookup each time until a provider
    is set.
    """
    if trace is None:
        return False
    provider = getattr(trace, "_TRACER_PROVIDER", _UNKNOWN)
    if provider is _UNKNOWN:  # another opentelemetry-api layout: ask it
        return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    return provider is not None


_UNKNOWN = object()


def _attributes(method: str, queue: str, call_id: str) -> dict[str, str]:
    return {
        "rpc.system": "kombu_rpc",
        "rpc.service": queue,
        "rpc.method": method,
        "kombu_rpc.call_id": call_id,
    }


@contextmanager
def client_span(method: str, queue: str, call_id: str) -> Iterator[Any]:
    """Start the caller's span for a call, current for the ``with`` block (so that
    :func:`outgoing_headers` injects it). The caller ends it with :func:`end_span`
    when the call ends. Yields ``None`` when not :func:`tracing`."""
    if not tracing():
        yield None
        return
    span = _tracer.start_span(
        method, kind=trace.SpanKind.CLIENT, attributes=_attributes(method, queue, call_id)
    )
    with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
        yield span


@contextmanager
def traced_call(method: str, queue: str, call_id: str) -> Iterator[None]:
    """A :func:`client_span` that ends with the ``with`` block (failed if it raises)."""
    with client_span(method, queue, call_id) as span:
        try:
            yield
        except BaseException as exc:
            end_span(span, exc)
            raise
        end_span(span)


def record_error(span: Any, error: BaseException) -> None:
    """Mark a span (or ``None``: not tracing) as failed with ``error``."""
    if span is not None:
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))


def end_span(span: Any, error: BaseException | None = None) -> None:
    """End a span from :func:`client_span`, marking it failed with ``error``."""
    if span is not None:
        if error is not None:
            record_error(span, error)
        span.end()


@contextmanager
def server_span(context: CallContext, queue: str, headers: Mapping[str, Any] | None) -> Iterator[Any]:
    """Serve ``context`` as the current call, inside a server span that continues the
    caller's trace when :func:`tracing`; yields the span, or ``None``."""
    token = _current.set(context)
    try:
        if not tracing():
            yield None
            return
        parent = propagate.extract(dict(headers or {}))
        with _tracer.start_as_current_span(
            context.method,
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes=_attributes(context.method, queue, context.call_id),
        ) as span:
            yield span
    finally:
        _current.reset(token)


class CallIdFilter(logging.Filter):
    """A logging filter that sets ``record.call_id`` (``"-"`` outside a remote call),
    for formats such as ``"%(call_id)s %(message)s"``."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the current call's id to ``record``; never drops it."""
        current = _current.get()
        record.call_id = current.call_id if current is not None else "-"
        return True
