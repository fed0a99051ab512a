"""Tracing without a network: spans go to an in-memory exporter.

What the relay and the consumers call (publish_span, consuming_span), the trace context an
event carries, the saga engine's spans (a span per step, attempts as events, the outcome as
status; a resumed saga continuing its stored trace), the log lines' trace ids, and the saga
metrics that go with them (parked by reason, retries, recoveries).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from ordermesh_shared import tracing
from ordermesh_shared.config import ServiceSettings
from ordermesh_shared.logging import configure_logging
from ordermesh_shared.messaging.envelope import decode_event
from ordermesh_shared.saga import SagaDefinition, SagaEngine, SagaMetrics, StepFailed
from ordermesh_shared.saga.memory import InMemorySagaStore
from ordermesh_shared.tracing import (
    Tracing,
    consuming_batch_span,
    consuming_span,
    current_traceparent,
    publish_span,
    tracing_from_settings,
)
from prometheus_client import CollectorRegistry

from tests.support.sagas import FAST, Trip, World
from tests.unit.test_outbox_envelope import outgoing, received


@pytest.fixture
async def spans() -> AsyncIterator[InMemorySpanExporter]:
    """Tracing on, each span exported as it ends."""
    exporter = InMemorySpanExporter()
    async with Tracing(service="test", instance_id="test-1", exporter=exporter, batch=False):
        yield exporter


def named(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    (span,) = [s for s in exporter.get_finished_spans() if s.name == name]
    return span


def trace_of(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan | trace.Span) -> int:
    context = span.get_span_context() if isinstance(span, trace.Span) else span.context
    assert context is not None
    return context.span_id


# -- the trace context of events ------------------------------------------------------------


async def test_an_event_carries_the_trace_it_was_written_in_and_the_consumer_continues_it(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.tracer("test").start_as_current_span("POST /orders") as request:
        stored = current_traceparent()
    assert stored is not None
    event = decode_event(received(outgoing(headers={"traceparent": stored})))
    assert event.traceparent == stored
    with consuming_span(event, queue="order.timeline"):
        pass
    handled = named(spans, "process order.order_created")
    assert handled.kind == SpanKind.CONSUMER
    assert trace_of(handled) == request.get_span_context().trace_id
    assert parent_of(handled) == span_id(request)
    assert handled.attributes is not None
    assert handled.attributes["messaging.destination.name"] == "order.timeline"


async def test_an_event_written_outside_a_trace_starts_one_when_consumed(
    spans: InMemorySpanExporter,
) -> None:
    assert current_traceparent() is None
    event = decode_event(received(outgoing(headers={})))
    assert event.traceparent is None
    with consuming_span(event):
        pass
    assert named(spans, "process order.order_created").parent is None


async def test_a_relay_batch_is_a_trace_of_its_own_linked_to_each_event(
    spans: InMemorySpanExporter,
) -> None:
    tracer = tracing.tracer("test")
    stored = []
    for name in ("order 1", "order 2"):
        with tracer.start_as_current_span(name):
            stored.append(current_traceparent())
    events = [outgoing(headers={"traceparent": tp}) for tp in stored]
    events.append(outgoing(headers={}))  # written outside a trace: nothing to link
    with tracer.start_as_current_span("relay loop"), publish_span(events, service="order"):
        pass
    batch = named(spans, "publish ordermesh.events")
    assert batch.kind == SpanKind.PRODUCER
    assert batch.parent is None  # not the relay loop's trace
    origins = [named(spans, name).context for name in ("order 1", "order 2")]
    linked = [(link.context.trace_id, link.context.span_id) for link in batch.links]
    assert linked == [(o.trace_id, o.span_id) for o in origins if o is not None]
    assert batch.attributes is not None
    assert batch.attributes["messaging.batch.message_count"] == 3


async def test_events_applied_together_are_one_span_linked_to_each(
    spans: InMemorySpanExporter,
) -> None:
    stored = []
    for name in ("order 1", "order 2"):
        with tracing.tracer("test").start_as_current_span(name):
            stored.append(current_traceparent())
    events = [decode_event(received(outgoing(headers={"traceparent": tp}))) for tp in stored]
    with consuming_batch_span(events, queue="order.timeline"):
        pass
    batch = named(spans, "process batch order.timeline")
    assert batch.parent is None
    origins = [named(spans, name).context for name in ("order 1", "order 2")]
    linked = [(link.context.trace_id, link.context.span_id) for link in batch.links]
    assert linked == [(o.trace_id, o.span_id) for o in origins if o is not None]


async def test_with_tracing_off_nothing_is_recorded_or_stored() -> None:
    assert not tracing.enabled()
    with tracing.tracer("test").start_as_current_span("anything"):
        assert current_traceparent() is None
    event = decode_event(received(outgoing()))
    with consuming_span(event) as consumed, publish_span([outgoing()], service="order") as sent:
        assert not consumed.is_recording()
        assert not sent.is_recording()


def test_tracing_is_off_unless_an_exporter_is_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def configured(**env: str) -> Tracing | None:
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_EXPORTER"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return tracing_from_settings(ServiceSettings(), service="order")

    assert configured() is None
    assert configured(OTEL_EXPORTER_OTLP_ENDPOINT="http://jaeger:4318") is not None
    assert configured(OTEL_TRACES_EXPORTER="console") is not None
    off = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318", "OTEL_TRACES_EXPORTER": "none"}
    assert configured(**off) is None


# -- log lines -------------------------------------------------------------------------------


@pytest.fixture
def json_logs() -> Iterator[Any]:
    """configure_logging as a service runs it; yields a reader of the JSON lines written."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging(service="order", instance_id="order-1")
    written = io.StringIO()
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(written)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in written.getvalue().splitlines()]

    try:
        yield lines
    finally:
        structlog.reset_defaults()
        root.handlers[:], root.level = handlers, level


async def test_log_lines_written_in_a_span_carry_its_trace_and_span_ids(
    spans: InMemorySpanExporter, json_logs: Any
) -> None:
    log = structlog.get_logger("test")
    with tracing.tracer("test").start_as_current_span("work") as work:
        log.info("inside")
        logging.getLogger("uvicorn.error").warning("stdlib inside")
    log.info("outside")
    inside, stdlib, outside = json_logs()
    context = work.get_span_context()
    for line in (inside, stdlib):
        assert line["trace_id"] == format(context.trace_id, "032x")
        assert line["span_id"] == format(context.span_id, "016x")
    assert "trace_id" not in outside


# -- the saga's spans and metrics -----------------------------------------------------------


async def run_saga(
    world: World, definition: SagaDefinition[Trip], metrics: SagaMetrics | None = None
) -> tuple[InMemorySagaStore, uuid.UUID, trace.Span]:
    """One saga created and launched inside a request's span, run to its end."""
    store = InMemorySagaStore()
    engine = SagaEngine(
        None, owner="t", definitions=[definition], policy=FAST, store=store, metrics=metrics
    )
    async with engine:
        with tracing.tracer("test").start_as_current_span("POST /orders") as request:
            saga_id = uuid.uuid4()
            await engine.create(None, definition, saga_id, Trip("Lisbon"))
            engine.launch(saga_id)
        assert await engine.wait(saga_id, timeout=10)
    return store, saga_id, request


def spans_of(exporter: InMemorySpanExporter, prefix: str) -> Sequence[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


async def test_each_step_is_a_span_of_the_order_trace_with_attempts_and_outcome(
    spans: InMemorySpanExporter,
) -> None:
    world = World()
    world.failures["hotel"] = [ConnectionError("hotel down")]
    world.failures["car"] = [StepFailed("no_cars", "none left")]
    store, saga_id, request = await run_saga(world, world.definition())
    saga = named(spans, "saga trip")
    assert trace_of(saga) == request.get_span_context().trace_id
    assert parent_of(saga) == span_id(request)
    steps = {
        s.name: s
        for s in spans.get_finished_spans()
        if s.name.startswith(("forward ", "compensate "))
    }
    assert list(steps) == [
        "forward flight",
        "forward hotel",
        "forward car",
        "compensate hotel",
        "compensate flight",
    ]
    assert all(trace_of(s) == trace_of(saga) for s in steps.values())
    assert all(parent_of(s) == span_id(saga) for s in steps.values())
    hotel = steps["forward hotel"]
    assert [(e.name, dict(e.attributes or {})) for e in hotel.events] == [
        ("attempt failed", {"attempt": 1, "error": "ConnectionError: hotel down"})
    ]
    assert hotel.status.status_code == StatusCode.OK
    car = steps["forward car"]
    assert car.status.status_code == StatusCode.ERROR
    assert car.attributes is not None
    assert car.attributes["saga.step.outcome"] == "rejected"
    stored = tracing.stored_context(store.sagas[saga_id].traceparent)
    assert stored is not None  # the request's context, kept for a resumed run
    kept = trace.get_current_span(stored).get_span_context()
    assert (kept.trace_id, kept.span_id) == (trace_of(saga), span_id(request))


async def recovered_by_another_owner(
    store: InMemorySagaStore,
    definition: SagaDefinition[Any],
    saga_id: uuid.UUID,
    metrics: SagaMetrics,
) -> None:
    """Owner "b" starts, takes the saga over (its lease has lapsed) and runs it to its end."""
    async with SagaEngine(
        None, owner="b", definitions=[definition], policy=FAST, store=store, metrics=metrics
    ):
        async with asyncio.timeout(5):
            while store.sagas[saga_id].status == "running":
                await asyncio.sleep(0.01)


def continued(spans: InMemorySpanExporter, request: trace.Span) -> ReadableSpan:
    """The resumed run's saga span, asserted a child of the request the saga was created in."""
    resumed = named(spans, "saga trip")
    assert trace_of(resumed) == request.get_span_context().trace_id
    assert parent_of(resumed) == span_id(request)
    return resumed


async def test_a_saga_resumed_after_a_crash_continues_its_original_trace(
    spans: InMemorySpanExporter,
) -> None:
    world = World()
    world.hang.add("hotel")
    definition = world.definition()
    store = InMemorySagaStore()
    crashed = SagaEngine(None, owner="a", definitions=[definition], policy=FAST, store=store)
    await crashed.__aenter__()
    with tracing.tracer("test").start_as_current_span("POST /orders") as request:
        saga_id = uuid.uuid4()
        await crashed.create(None, definition, saga_id, Trip("Lisbon"))
        crashed.launch(saga_id)
    async with asyncio.timeout(5):
        while "hotel" not in world.calls:
            await asyncio.sleep(0.005)
    killed = [*crashed._loops, *crashed._running.values()]
    for task in killed:
        task.cancel()  # killed: no shutdown, no handover; its lease lapses
    await asyncio.gather(*killed, return_exceptions=True)
    spans.clear()  # what the dead run exported (a killed process exports nothing)
    world.hang.clear()
    metrics = SagaMetrics(CollectorRegistry())
    await recovered_by_another_owner(store, definition, saga_id, metrics)
    resumed = continued(spans, request)
    assert resumed.attributes is not None
    assert resumed.attributes["saga.resumed"] is True
    assert [s.name for s in spans_of(spans, "forward ")] == ["forward hotel", "forward car"]
    assert all(trace_of(s) == trace_of(resumed) for s in spans.get_finished_spans())
    assert metrics.recovered._value.get() == 1


async def test_a_saga_whose_process_died_before_its_first_step_continues_its_trace(
    spans: InMemorySpanExporter,
) -> None:
    world = World()
    definition = world.definition()
    store = InMemorySagaStore()
    crashed = SagaEngine(None, owner="a", definitions=[definition], policy=FAST, store=store)
    with tracing.tracer("test").start_as_current_span("POST /orders") as request:
        saga_id = uuid.uuid4()
        await crashed.create(None, definition, saga_id, Trip("Lisbon"))
    # Never launched: the process died between the commit and the saga's first step.
    store.sagas[saga_id].lease_until = 0.0
    await recovered_by_another_owner(store, definition, saga_id, SagaMetrics(CollectorRegistry()))
    continued(spans, request)
    assert [s.name for s in spans_of(spans, "forward ")] == [
        "forward flight",
        "forward hotel",
        "forward car",
    ]


async def test_a_parked_saga_counts_its_reason_and_the_retries_of_its_undo() -> None:
    world = World()
    world.failures["car"] = [StepFailed("no_cars", "none left")]
    refusal = StepFailed("already_settled", "nothing to refund")
    world.failures["undo-flight"] = [refusal] * FAST.compensation_attempts
    registry = CollectorRegistry()
    store, saga_id, _ = await run_saga(world, world.definition(), SagaMetrics(registry))
    assert store.sagas[saga_id].status == "compensation_failed"
    parked = {"saga": "trip", "step": "flight", "reason": "already_settled"}
    assert registry.get_sample_value("sagas_parked_total", parked) == 1
    undo = {"saga": "trip", "step": "flight", "direction": "compensate"}
    assert registry.get_sample_value("saga_step_retries_total", undo) == (
        FAST.compensation_attempts - 1
    )


def test_parking_reasons_stay_a_bounded_set() -> None:
    registry = CollectorRegistry()
    metrics = SagaMetrics(registry)
    for n in range(30):
        metrics.count_parked("trip", "flight", f"reason_{n}")
    metrics.count_parked("trip", "flight", "Not A Code: free text")
    reasons = {
        sample.labels["reason"]
        for family in registry.collect()
        if family.name == "sagas_parked"
        for sample in family.samples
        if sample.name == "sagas_parked_total"
    }
    assert len(reasons) == 21
    assert "other" in reasons
