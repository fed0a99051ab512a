"""OpenTelemetry tracing: one trace per order, across HTTP, saga steps, SQL and AMQP.

Off unless an exporter is configured (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_TRACES_EXPORTER=otlp|console``; see
:func:`tracing_from_settings`). Off, nothing is instrumented and the helpers below cost a
contextvar read. On, the bootstrap instruments:

* the app's server spans (FastAPI instrumentation; health, metrics and overview polls left out);
* the ServiceClient's aiohttp session (a client span per attempt, ``traceparent`` sent);
* asyncpg (a span per statement, only inside a trace: :class:`_NoOrphanQueries` drops the
  background loops' queries that would each start a trace of their own);
* the saga engine's spans (:func:`saga_span`, :func:`step_span`), the outbox row's stored
  ``traceparent`` (:func:`current_traceparent`), the relay's publish (:func:`publish_span`)
  and each consumer's handling (:func:`consuming_span`, or :func:`consuming_batch_span` for
  events applied together).

>>> tracing = tracing_from_settings(settings, service="order")      # None: tracing off
>>> tracing.instrument_app(app)                                      # when the app is made
>>> async with tracing:                                              # in the lifespan
...     with consuming_span(event, queue="order.timeline"):
...         await handler(conn, event)

asyncpg's instrumentation patches the driver for the whole process, so it records with the
provider of the first :class:`Tracing` started (one per process outside tests).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes, AttributeValue

if TYPE_CHECKING:
    import aiohttp
    from fastapi import FastAPI

    from ordermesh_shared.config import ServiceSettings

TRACEPARENT = "traceparent"
# Polled every second or two by probes, Prometheus and the overview page: not worth a trace.
UNTRACED_URLS = "/health/live,/health/ready,/metrics,/admin/overview,/ui"

_PROPAGATOR = TraceContextTextMapPropagator()
_NO_TRACER = trace.NoOpTracer()


class _Event(Protocol):
    """What :func:`consuming_span` reads of a received event (``messaging.Event``)."""

    @property
    def id(self) -> str: ...

    @property
    def routing_key(self) -> str: ...

    @property
    def traceparent(self) -> str | None: ...


class _Outgoing(Protocol):
    """What :func:`publish_span` reads of an outbox row (``messaging.OutgoingEvent``)."""

    @property
    def headers(self) -> Any: ...


class _NoOrphanQueries(Sampler):
    """Root spans are sampled, except client spans (SQL, HTTP calls) outside any trace: the
    relay's polls, the saga heartbeat and the monitors would otherwise each start a trace."""

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        if kind == SpanKind.CLIENT:
            return SamplingResult(Decision.DROP)
        return ALWAYS_ON.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return "NoOrphanQueries"


class Tracing:
    """One service's tracer provider and span pipeline; started and flushed by the lifespan.

    >>> tracing = Tracing(service="order", instance_id="order-1", exporter=OTLPSpanExporter())
    >>> tracing.instrument_app(app)
    >>> async with tracing: ...          # spans exported; flushed on the way out

    Several apps of one process (tests) may share one: it starts with the first ``async
    with`` and stops with the last. ``batch=False`` exports each span as it ends (tests).
    """

    def __init__(
        self, *, service: str, instance_id: str, exporter: SpanExporter, batch: bool = True
    ) -> None:
        resource = Resource.create({"service.name": service, "service.instance.id": instance_id})
        self.provider = TracerProvider(resource=resource, sampler=ParentBased(_NoOrphanQueries()))
        self._exporter = exporter
        self._batch = batch
        self._users = 0

    def tracer(self, name: str) -> trace.Tracer:
        """A tracer of this provider."""
        return self.provider.get_tracer(name)

    def instrument_app(self, app: FastAPI) -> None:
        """Server spans for ``app`` (call when the app is made, before it first runs)."""
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=self.provider,
            excluded_urls=UNTRACED_URLS,
            # Per-message send/receive spans double the spans of a request for nothing.
            exclude_spans=["receive", "send"],
        )

    def client_trace_configs(self) -> list[aiohttp.TraceConfig]:
        """For the ServiceClient's aiohttp session: a client span per attempt, traceparent
        sent with it."""
        from opentelemetry.instrumentation.aiohttp_client import create_trace_config

        return [create_trace_config(tracer_provider=self.provider)]

    async def __aenter__(self) -> Tracing:
        if self._users == 0:
            self._start()
        self._users += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._users -= 1
        if self._users == 0:
            await self._stop()

    def _start(self) -> None:
        # Here, not in __init__: the batch processor starts a thread.
        processor = BatchSpanProcessor if self._batch else SimpleSpanProcessor
        self.provider.add_span_processor(processor(self._exporter))
        _ACTIVE.append(self)
        if len(_ACTIVE) == 1:
            _instrument_asyncpg(self.provider)

    async def _stop(self) -> None:
        _ACTIVE.remove(self)
        if not _ACTIVE:
            _uninstrument_asyncpg()
        # Flushes what is queued (a span ending later is lost), in a thread: an exporter
        # whose collector is away blocks up to its timeout, and the loop still has work.
        await asyncio.to_thread(self.provider.shutdown)


# The started Tracing objects of this process (one outside tests): the saga engine, the
# relay and the consumers take their tracer from the latest.
_ACTIVE: list[Tracing] = []


def _instrument_asyncpg(provider: TracerProvider) -> None:
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]


def _uninstrument_asyncpg() -> None:
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    AsyncPGInstrumentor().uninstrument()  # type: ignore[no-untyped-call]


def tracing_from_settings(settings: ServiceSettings, *, service: str) -> Tracing | None:
    """The service's tracing as configured, or None (off: no exporter configured, or
    ``OTEL_TRACES_EXPORTER=none``). The OTLP/HTTP exporter sends to
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, else ``OTEL_EXPORTER_OTLP_ENDPOINT`` +
    ``/v1/traces``, else the exporter's default (``http://localhost:4318/v1/traces``)."""
    kind = settings.otel_traces_exporter
    endpoint = settings.otel_exporter_otlp_traces_endpoint or _signal_url(
        settings.otel_exporter_otlp_endpoint
    )
    if kind == "none" or (kind == "" and not endpoint):
        return None
    exporter = ConsoleSpanExporter() if kind == "console" else _otlp(endpoint)
    return Tracing(service=service, instance_id=settings.instance_id, exporter=exporter)


def _signal_url(base: str) -> str:
    return f"{base.rstrip('/')}/v1/traces" if base else ""


def _otlp(endpoint: str) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint or None)


def tracer(name: str) -> trace.Tracer:
    """The tracer of the process's started tracing, or a no-op one while tracing is off."""
    return _ACTIVE[-1].tracer(name) if _ACTIVE else _NO_TRACER


def enabled() -> bool:
    """Whether a tracing pipeline runs in this process."""
    return bool(_ACTIVE)


# -- carrying a trace across storage and messages -------------------------------------------


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span (None outside a sampled trace): what
    the outbox stores with an event and the saga with its row."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get(TRACEPARENT)


def stored_context(traceparent: str | None) -> Context | None:
    """The context a stored ``traceparent`` names (None when absent or malformed)."""
    if not traceparent:
        return None
    context = _PROPAGATOR.extract({TRACEPARENT: traceparent})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def _link(traceparent: str | None) -> Link | None:
    context = stored_context(traceparent)
    return None if context is None else Link(trace.get_current_span(context).get_span_context())


@contextmanager
def publish_span(events: Sequence[_Outgoing], *, service: str) -> Iterator[trace.Span]:
    """The relay's span around publishing one batch: a trace of its own (a batch mixes
    many orders), linked to each event's stored context; and, in each event's own trace, a
    ``send`` span (child of the context it was written in, linked to the batch), so an
    order's trace shows its events leaving through the relay.

    >>> with publish_span(claim.events, service="order"):
    ...     confirms = await publisher.publish(claim.events)
    """
    if not _ACTIVE:
        yield trace.INVALID_SPAN
        return
    links = [link for e in events if (link := _link(e.headers.get(TRACEPARENT))) is not None]
    attributes: dict[str, AttributeValue] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "publish",
        "messaging.batch.message_count": len(events),
        "ordermesh.service": service,
    }
    with tracer("ordermesh.outbox").start_as_current_span(
        "publish ordermesh.events",
        context=Context(),  # not the relay loop's context: every batch is its own trace
        kind=SpanKind.PRODUCER,
        links=links,
        attributes=attributes,
    ) as span:
        parents = [("send ordermesh.events", e.headers.get(TRACEPARENT)) for e in events]
        with _in_each_trace(
            "ordermesh.outbox", parents, batch=span, kind=SpanKind.PRODUCER, attributes=attributes
        ):
            yield span


@contextmanager
def _in_each_trace(
    tracer_name: str,
    parents: Sequence[tuple[str, str | None]],
    *,
    batch: trace.Span,
    kind: SpanKind,
    attributes: Attributes = None,
) -> Iterator[None]:
    """For a batch span of its own trace: a span (name, stored parent) in each event's trace,
    linked to the batch and lasting as long, so each order's trace shows the step too."""
    batch_link = [Link(batch.get_span_context())]
    spans = [
        tracer(tracer_name).start_span(
            name, context=context, kind=kind, links=batch_link, attributes=attributes
        )
        for name, traceparent in parents
        if (context := stored_context(traceparent)) is not None
    ]
    try:
        yield
    finally:
        for span in spans:
            span.end()


@contextmanager
def consuming_span(event: _Event, *, queue: str = "") -> Iterator[trace.Span]:
    """A consumer's span around handling ``event``, continuing the trace stored with it
    (a new trace when the event carries none).

    >>> with consuming_span(event, queue="order.timeline"):
    ...     await subscription.handler(conn, event)
    """
    if not _ACTIVE:
        yield trace.INVALID_SPAN
        return
    attributes = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.message.id": event.id,
        "messaging.destination.name": queue,
        "messaging.rabbitmq.destination.routing_key": event.routing_key,
    }
    with tracer("ordermesh.messaging").start_as_current_span(
        f"process {event.routing_key}",
        context=stored_context(event.traceparent) or Context(),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    ) as span:
        yield span


@contextmanager
def consuming_batch_span(events: Sequence[_Event], *, queue: str = "") -> Iterator[trace.Span]:
    """A consumer's span around applying several events in one transaction: a trace of its
    own (they come from many orders), linked to each event's stored context; and in each
    event's trace a ``process`` span, as for an event applied alone.

    >>> with consuming_batch_span(new, queue="order.timeline"):
    ...     await subscription.batch_handler(conn, new)
    """
    if not _ACTIVE:
        yield trace.INVALID_SPAN
        return
    links = [link for e in events if (link := _link(e.traceparent)) is not None]
    attributes: dict[str, AttributeValue] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.destination.name": queue,
        "messaging.batch.message_count": len(events),
    }
    with tracer("ordermesh.messaging").start_as_current_span(
        f"process batch {queue}".rstrip(),
        context=Context(),
        kind=SpanKind.CONSUMER,
        links=links,
        attributes=attributes,
    ) as span:
        parents = [(f"process {e.routing_key}", e.traceparent) for e in events]
        with _in_each_trace(
            "ordermesh.messaging",
            parents,
            batch=span,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        ):
            yield span


# -- the saga's spans --------------------------------------------------------------------------


@contextmanager
def saga_span(
    saga: str, saga_id: object, *, stored: str | None, resumed: bool
) -> Iterator[trace.Span]:
    """A saga's run in this process. A resumed saga (recovered after a crash, re-driven by
    an operator) continues the trace stored with it, linked to what resumed it."""
    if not _ACTIVE:
        yield trace.INVALID_SPAN
        return
    origin = stored_context(stored) if resumed else None
    here = trace.get_current_span().get_span_context()
    links = [Link(here)] if origin is not None and here.is_valid else []
    attributes: dict[str, AttributeValue] = {
        "saga.name": saga,
        "saga.id": str(saga_id),
        "saga.resumed": resumed,
    }
    with tracer("ordermesh.saga").start_as_current_span(
        f"saga {saga}", context=origin, links=links, attributes=attributes
    ) as span:
        yield span


@contextmanager
def step_span(saga: str, step: str, direction: str) -> Iterator[trace.Span]:
    """One step of a saga, forward or compensate; attempts are its events."""
    if not _ACTIVE:
        yield trace.INVALID_SPAN
        return
    attributes = {"saga.name": saga, "saga.step": step, "saga.direction": direction}
    with tracer("ordermesh.saga").start_as_current_span(
        f"{direction} {step}", attributes=attributes, record_exception=False
    ) as span:
        yield span


def step_outcome(span: trace.Span, outcome: str, error: str | None = None) -> None:
    """A step span's end: ``succeeded`` is OK, ``rejected`` and ``failed`` are errors."""
    if not span.is_recording():
        return
    span.set_attribute("saga.step.outcome", outcome)
    if outcome == "succeeded":
        span.set_status(Status(StatusCode.OK))
    else:
        span.set_status(Status(StatusCode.ERROR, error or outcome))


def attempt_failed(attempt: int, error: str) -> None:
    """A failed attempt, as an event of the current (step) span."""
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event("attempt failed", {"attempt": attempt, "error": error})
