"""Metrics of servers and proxies, for Prometheus and OpenTelemetry.

Nothing is measured until :func:`enable` is called; then every server and proxy of the
process counts into the same instruments::

    from prometheus_client import start_http_server
    from kombu_rpc import metrics

    metrics.enable()              # prometheus_client's default registry
    start_http_server(9100)       # or: kombu-rpc serve --metrics-port 9100

``enable(registry=my_registry)`` registers them on a registry of your own, and
``enable(prometheus=False, opentelemetry=True)`` records the same numbers as
OpenTelemetry instruments of the global meter provider (both may be on at once).

The instruments (``queue`` is the request queue, ``method`` the remote name):

- ``kombu_rpc_server_calls_total{queue, method, outcome}``: calls a server ran;
  ``outcome`` is ``ok``, ``error`` (the function raised) or ``refused`` (unknown
  method, wrong arguments, bad signature, past its deadline).
- ``kombu_rpc_server_call_duration_seconds{queue, method}``: how long functions ran.
- ``kombu_rpc_server_queue_wait_seconds{queue}``: from a request's publishing to its
  run starting (by the two hosts' clocks).
- ``kombu_rpc_server_calls_in_flight{queue}``: calls running now.
- ``kombu_rpc_server_redeliveries_total``, ``kombu_rpc_server_reconnects_total``,
  ``kombu_rpc_server_reply_nacks_total`` (each by ``queue``): requests the broker
  delivered again, connections opened again, replies the broker refused.
- ``kombu_rpc_client_calls_total{queue, method, outcome}``: calls a proxy made that
  expect a reply; ``outcome`` is ``ok``, ``remote_error``, ``timeout``, ``no_server``,
  ``connection_lost``, ``cancelled`` (by the caller) or ``error``.
- ``kombu_rpc_client_call_duration_seconds{queue, method}``: from sending to the outcome.
- ``kombu_rpc_client_calls_in_flight{queue}``: calls waiting for their reply.
- ``kombu_rpc_client_dropped_replies_total{reason}``: replies no call waited for,
  ``late`` (late or duplicate) or ``unknown`` (no correlation id).
- ``kombu_rpc_client_reconnects_total``, ``kombu_rpc_client_publish_nacks_total``:
  connections a proxy opened again, requests the broker refused.
- ``kombu_rpc_events_handled_total{exchange, subscription, outcome}``: events a
  server's subscribed functions received (:mod:`kombu_rpc.events`); ``outcome`` is
  ``ok``, ``error`` (the handler raised) or ``malformed`` (rejected unread).
- ``kombu_rpc_events_published_total{exchange}``: events an
  :class:`~kombu_rpc.events.EventPublisher` published.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, ConnectionLostError, NoServerError, RemoteError, RPCTimeout

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["disable", "enable"]

#: Histogram buckets, in seconds: RPC calls run from sub-millisecond to minutes.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Counted events of servers (each by queue) and of proxies, with their descriptions.
SERVER_EVENTS = {
    "redeliveries": "Requests the broker delivered again",
    "reconnects": "Connections a server opened again",
    "reply_nacks": "Replies the broker refused",
}
CLIENT_EVENTS = {
    "dropped_replies": "Replies no call waited for",
    "reconnects": "Connections a proxy opened again",
    "publish_nacks": "Requests the broker refused",
}

#: The recorder servers and proxies report to; ``None`` while metrics are off (the
#: only cost then is reading this name).
recorder: Recorder | None = None
_lock = threading.Lock()


def client_outcome(exc: BaseException | None) -> str:
    """The ``outcome`` label of a proxy's call that ended with ``exc``."""
    if exc is None:
        return "ok"
    if isinstance(exc, RemoteError):
        return "remote_error"
    if isinstance(exc, RPCTimeout):
        return "timeout"
    if isinstance(exc, NoServerError):
        return "no_server"
    if isinstance(exc, ConnectionLostError):
        return "connection_lost"
    return "error"


class Recorder:
    """What servers and proxies report; each method records one event."""

    def server_call_started(self, queue: str) -> None:
        """A server started running a call."""

    def server_call_ended(
        self, queue: str, method: str, outcome: str, seconds: float, queue_wait: float | None
    ) -> None:
        """A call a server ran (or refused) ended: ``outcome`` is ``ok``, ``error`` or
        ``refused``; ``seconds`` it ran; ``queue_wait`` from publishing to running."""

    def server_call_refused(self, queue: str, method: str) -> None:
        """A server refused a request (``method`` is ``""`` if it could not be read)."""

    def server_event(self, queue: str, event: str) -> None:
        """One of ``redeliveries``, ``reconnects`` or ``reply_nacks`` on a server of
        ``queue``."""

    def client_call_started(self, queue: str) -> None:
        """A proxy sent a call that expects a reply."""

    def client_call_ended(self, queue: str, method: str, outcome: str, seconds: float) -> None:
        """A proxy's call ended with ``outcome`` (see :func:`client_outcome`)."""

    def client_event(self, event: str, label: str = "") -> None:
        """One of ``dropped_replies`` (``label``: ``late`` or ``unknown``),
        ``reconnects`` or ``publish_nacks`` on a proxy."""

    def event_handled(self, exchange: str, subscription: str, outcome: str) -> None:
        """A server received an event for ``subscription``: ``outcome`` is ``ok``,
        ``error`` or ``malformed``."""

    def event_published(self, exchange: str) -> None:
        """An event was published to ``exchange``."""


class _Prometheus(Recorder):
    def __init__(self, registry: CollectorRegistry | None) -> None:
        try:
            from prometheus_client import REGISTRY, Counter, Gauge, Histogram
        except ImportError as exc:
            raise ConfigurationError(
                "metrics for Prometheus need prometheus_client: pip install 'kombu-rpc[metrics]' "
                "(or pip install -e '.[metrics]' in a checkout)"
            ) from exc
        reg = REGISTRY if registry is None else registry
        labels = ("queue", "method", "outcome")
        self.server_calls = Counter(
            "kombu_rpc_server_calls",
            "Calls a server handled (ran or refused), by outcome",
            labels,
            registry=reg,
        )
        self.server_duration = Histogram(
            "kombu_rpc_server_call_duration_seconds",
            "How long the remote functions ran",
            ("queue", "method"),
            buckets=BUCKETS,
            registry=reg,
        )
        self.server_wait = Histogram(
            "kombu_rpc_server_queue_wait_seconds",
            "From a request's publishing to its run starting",
            ("queue",),
            buckets=BUCKETS,
            registry=reg,
        )
        self.server_in_flight = Gauge(
            "kombu_rpc_server_calls_in_flight", "Calls running now", ("queue",), registry=reg
        )
        self.server_events = {
            event: Counter(f"kombu_rpc_server_{event}", text, ("queue",), registry=reg)
            for event, text in SERVER_EVENTS.items()
        }
        self.client_calls = Counter(
            "kombu_rpc_client_calls", "Calls a proxy made, by outcome", labels, registry=reg
        )
        self.client_duration = Histogram(
            "kombu_rpc_client_call_duration_seconds",
            "From sending a call to its outcome",
            ("queue", "method"),
            buckets=BUCKETS,
            registry=reg,
        )
        self.client_in_flight = Gauge(
            "kombu_rpc_client_calls_in_flight", "Calls waiting for a reply", ("queue",), registry=reg
        )
        self.client_events = {
            event: Counter(f"kombu_rpc_client_{event}", text, _labels(event), registry=reg)
            for event, text in CLIENT_EVENTS.items()
        }
        self.events_handled = Counter(
            "kombu_rpc_events_handled",
            "Events subscribed functions received, by outcome",
            ("exchange", "subscription", "outcome"),
            registry=reg,
        )
        self.events_published = Counter(
            "kombu_rpc_events_published", "Events published", ("exchange",), registry=reg
        )
        self.registry = reg

    def server_call_started(self, queue: str) -> None:
        self.server_in_flight.labels(queue).inc()

    def server_call_ended(
        self, queue: str, method: str, outcome: str, seconds: float, queue_wait: float | None
    ) -> None:
        self.server_in_flight.labels(queue).dec()
        self.server_calls.labels(queue, method, outcome).inc()
        self.server_duration.labels(queue, method).observe(seconds)
        if queue_wait is not None:
            self.server_wait.labels(queue).observe(max(queue_wait, 0.0))

    def server_call_refused(self, queue: str, method: str) -> None:
        self.server_calls.labels(queue, method, "refused").inc()

    def server_event(self, queue: str, event: str) -> None:
        self.server_events[event].labels(queue).inc()

    def client_call_started(self, queue: str) -> None:
        self.client_in_flight.labels(queue).inc()

    def client_call_ended(self, queue: str, method: str, outcome: str, seconds: float) -> None:
        self.client_in_flight.labels(queue).dec()
        self.client_calls.labels(queue, method, outcome).inc()
        self.client_duration.labels(queue, method).observe(seconds)

    def client_event(self, event: str, label: str = "") -> None:
        counter = self.client_events[event]
        (counter.labels(label) if label else counter).inc()

    def event_handled(self, exchange: str, subscription: str, outcome: str) -> None:
        self.events_handled.labels(exchange, subscription, outcome).inc()

    def event_published(self, exchange: str) -> None:
        self.events_published.labels(exchange).inc()

    def unregister(self) -> None:
        for collector in (
            self.server_calls,
            self.server_duration,
            self.server_wait,
            self.server_in_flight,
            *self.server_events.values(),
            self.client_calls,
            self.client_duration,
            self.client_in_flight,
            *self.client_events.values(),
            self.events_handled,
            self.events_published,
        ):
            self.registry.unregister(collector)


def _labels(client_event: str) -> tuple[str, ...]:
    return ("reason",) if client_event == "dropped_replies" else ()


class _OpenTelemetry(Recorder):
    """The same instruments through the global OpenTelemetry meter provider (names
    without ``_total`` and unit suffixes, which OpenTelemetry adds on export)."""

    def __init__(self, meter_provider: Any) -> None:
        try:
            from opentelemetry import metrics as otel
        except ImportError as exc:
            raise ConfigurationError(
                "OpenTelemetry metrics need opentelemetry-api: pip install 'kombu-rpc[otel]'"
            ) from exc
        meter = otel.get_meter("kombu_rpc", meter_provider=meter_provider)
        self.server_calls = meter.create_counter("kombu_rpc.server.calls", description="Calls a server ran")
        self.server_duration = meter.create_histogram(
            "kombu_rpc.server.call.duration", unit="s", description="How long the remote functions ran"
        )
        self.server_wait = meter.create_histogram(
            "kombu_rpc.server.queue_wait", unit="s", description="From a request's publishing to its run"
        )
        self.server_in_flight = meter.create_up_down_counter(
            "kombu_rpc.server.calls_in_flight", description="Calls running now"
        )
        self.server_events = {
            event: meter.create_counter(f"kombu_rpc.server.{event}", description=text)
            for event, text in SERVER_EVENTS.items()
        }
        self.client_calls = meter.create_counter("kombu_rpc.client.calls", description="Calls a proxy made")
        self.client_duration = meter.create_histogram(
            "kombu_rpc.client.call.duration", unit="s", description="From sending a call to its outcome"
        )
        self.client_in_flight = meter.create_up_down_counter(
            "kombu_rpc.client.calls_in_flight", description="Calls waiting for a reply"
        )
        self.client_events = {
            event: meter.create_counter(f"kombu_rpc.client.{event}", description=text)
            for event, text in CLIENT_EVENTS.items()
        }
        self.events_handled = meter.create_counter(
            "kombu_rpc.events.handled", description="Events subscribed functions received"
        )
        self.events_published = meter.create_counter(
            "kombu_rpc.events.published", description="Events published"
        )

    def server_call_started(self, queue: str) -> None:
        self.server_in_flight.add(1, {"queue": queue})

    def server_call_ended(
        self, queue: str, method: str, outcome: str, seconds: float, queue_wait: float | None
    ) -> None:
        self.server_in_flight.add(-1, {"queue": queue})
        self.server_calls.add(1, {"queue": queue, "method": method, "outcome": outcome})
        self.server_duration.record(seconds, {"queue": queue, "method": method})
        if queue_wait is not None:
            self.server_wait.record(max(queue_wait, 0.0), {"queue": queue})

    def server_call_refused(self, queue: str, method: str) -> None:
        self.server_calls.add(1, {"queue": queue, "method": method, "outcome": "refused"})

    def server_event(self, queue: str, event: str) -> None:
        self.server_events[event].add(1, {"queue": queue})

    def client_call_started(self, queue: str) -> None:
        self.client_in_flight.add(1, {"queue": queue})

    def client_call_ended(self, queue: str, method: str, outcome: str, seconds: float) -> None:
        self.client_in_flight.add(-1, {"queue": queue})
        self.client_calls.add(1, {"queue": queue, "method": method, "outcome": outcome})
        self.client_duration.record(seconds, {"queue": queue, "method": method})

    def client_event(self, event: str, label: str = "") -> None:
        self.client_events[event].add(1, {"reason": label} if label else {})

    def event_handled(self, exchange: str, subscription: str, outcome: str) -> None:
        self.events_handled.add(1, {"exchange": exchange, "subscription": subscription, "outcome": outcome})

    def event_published(self, exchange: str) -> None:
        self.events_published.add(1, {"exchange": exchange})


class _Both(Recorder):
    def __init__(self, *recorders: Recorder) -> None:
        self.recorders = recorders

    def server_call_started(self, queue: str) -> None:
        for r in self.recorders:
            r.server_call_started(queue)

    def server_call_ended(
        self, queue: str, method: str, outcome: str, seconds: float, queue_wait: float | None
    ) -> None:
        for r in self.recorders:
            r.server_call_ended(queue, method, outcome, seconds, queue_wait)

    def server_call_refused(self, queue: str, method: str) -> None:
        for r in self.recorders:
            r.server_call_refused(queue, method)

    def server_event(self, queue: str, event: str) -> None:
        for r in self.recorders:
            r.server_event(queue, event)

    def client_call_started(self, queue: str) -> None:
        for r in self.recorders:
            r.client_call_started(queue)

    def client_call_ended(self, queue: str, method: str, outcome: str, seconds: float) -> None:
        for r in self.recorders:
            r.client_call_ended(queue, method, outcome, seconds)

    def client_event(self, event: str, label: str = "") -> None:
        for r in self.recorders:
            r.client_event(event, label)

    def event_handled(self, exchange: str, subscription: str, outcome: str) -> None:
        for r in self.recorders:
            r.event_handled(exchange, subscription, outcome)

    def event_published(self, exchange: str) -> None:
        for r in self.recorders:
            r.event_published(exchange)


def count_event(event: str, label: str = "") -> None:
    """Report a proxy's ``event`` (:meth:`Recorder.client_event`), if metrics are on."""
    current = recorder
    if current is not None:
        current.client_event(event, label)


def count_server_event(queue: str, event: str) -> None:
    """Report a server's ``event`` (:meth:`Recorder.server_event`), if metrics are on."""
    current = recorder
    if current is not None:
        current.server_event(queue, event)


def enable(
    registry: CollectorRegistry | None = None,
    *,
    prometheus: bool = True,
    opentelemetry: bool = False,
    meter_provider: Any = None,
) -> None:
    """Start measuring every server and proxy of this process.

    Args:
        registry: The ``prometheus_client`` registry to register the instruments on
            (default: its global ``REGISTRY``, which ``start_http_server`` exposes).
        prometheus: Record into ``prometheus_client`` instruments.
        opentelemetry: Record into OpenTelemetry instruments of ``meter_provider``
            (default: the global one, ``opentelemetry.metrics.set_meter_provider``).
        meter_provider: An OpenTelemetry ``MeterProvider``.

    Raises:
        ConfigurationError: Already enabled (call :func:`disable` first), neither
            kind chosen, or the package a kind needs is not installed.
    """
    global recorder
    with _lock:
        if recorder is not None:
            raise ConfigurationError("kombu_rpc metrics are already enabled; call metrics.disable() first")
        if not (prometheus or opentelemetry):
            raise ConfigurationError("metrics.enable() needs prometheus=True or opentelemetry=True")
        chosen: list[Recorder] = []
        if opentelemetry:  # first: if it cannot be made, nothing was registered yet
            chosen.append(_OpenTelemetry(meter_provider))
        if prometheus:
            chosen.append(_Prometheus(registry))
        recorder = chosen[0] if len(chosen) == 1 else _Both(*chosen)


def disable() -> None:
    """Stop measuring, and unregister the Prometheus instruments (their counts go)."""
    global recorder
    with _lock:
        current, recorder = recorder, None
    prometheus = _prometheus(current)
    if prometheus is not None:
        prometheus.unregister()


def prometheus_registry() -> Any:
    """The registry the Prometheus instruments are on, or ``None`` if none are."""
    prometheus = _prometheus(recorder)
    return None if prometheus is None else prometheus.registry


def _prometheus(current: Recorder | None) -> _Prometheus | None:
    """The Prometheus recorder of ``current``, alone or one of :class:`_Both`'s."""
    for r in current.recorders if isinstance(current, _Both) else (current,):
        if isinstance(r, _Prometheus):
            return r
    return None
