"""One trace per order, across the four services (issue 16, item 1).

The four services run in-process, each on a database of its own, the participants on
loopback ports so that the order service calls them through the real ServiceClient (aiohttp,
its client spans and the ``traceparent`` header); every app's spans go to one in-memory
exporter. One ``POST /orders`` must give one trace: the order's server span, the saga and
each of its steps, the client calls, the participants' server spans and their SQL; the
outbox rows written on the way store the same trace's ``traceparent``, and the log lines
written meanwhile carry its ids (and the participants' their ``order_id``). A saga resumed
by another owner after a crash continues the trace its context was stored with.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import inventory.api
import payment.api
import pytest
import shipping.api
import structlog
from inventory.app import SPEC as INVENTORY
from inventory.app import InventorySettings
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Span, SpanKind
from order.app import OrderSettings, order_spec
from ordermesh_shared.bootstrap import ServiceSpec
from ordermesh_shared.config import ServiceSettings
from ordermesh_shared.database import Database
from ordermesh_shared.logging import add_trace_ids
from ordermesh_shared.saga import SAGA_MIGRATIONS, SagaDefinition, SagaEngine
from ordermesh_shared.tracing import Tracing, tracer
from payment.app import SPEC as PAYMENT
from payment.app import PaymentSettings
from shipping.app import SPEC as SHIPPING
from shipping.app import ShippingSettings

from tests.support.apps import running, wait_ready
from tests.support.fakes import InMemoryRegistry
from tests.support.http_serving import loopback_socket, serving
from tests.support.postgres import database_for_the_stack
from tests.support.sagas import FAST, Trip, World

pytestmark = pytest.mark.integration

PARTICIPANTS: tuple[tuple[str, type[ServiceSettings], ServiceSpec], ...] = (
    ("inventory", InventorySettings, INVENTORY),
    ("payment", PaymentSettings, PAYMENT),
    ("shipping", ShippingSettings, SHIPPING),
)
SETTINGS: dict[str, Any] = {"outbox_relay": "off", "db_pool_max": 2, "prune_interval": 86400.0}
ORDER = {"customer_id": "alice", "items": [{"sku": "CB-404", "quantity": 1}], "destination": "DE"}


@dataclass
class Services:
    order: httpx.AsyncClient
    dsns: dict[str, str]


@asynccontextmanager
async def four_services(
    vhost: str, exporter: InMemorySpanExporter, *, relay: str = "off"
) -> AsyncIterator[Services]:
    """Order, inventory, payment and shipping, ready and registered, all traced (with
    ``relay`` "standalone": each relays its outbox, and order consumes the timeline)."""
    registry = InMemoryRegistry()
    options = SETTINGS | {"outbox_relay": relay}
    async with AsyncExitStack() as stack:
        dsns = {}
        for name, settings_cls, spec in PARTICIPANTS:
            dsns[name] = await database_for_the_stack(stack, f"om_tr_{name}")
            listening = stack.enter_context(loopback_socket())
            settings = settings_cls(
                database_url=dsns[name],
                rabbitmq_url=vhost,
                port=listening.getsockname()[1],
                **options,
            )
            client = await stack.enter_async_context(
                running(spec, settings, registry, tracing=traced(name, exporter))
            )
            await stack.enter_async_context(serving(client, listening))
            await wait_ready(client)
        dsns["order"] = await database_for_the_stack(stack, "om_tr_order")
        settings = OrderSettings(
            database_url=dsns["order"], rabbitmq_url=vhost, order_wait=10.0, **options
        )
        order = await stack.enter_async_context(
            running(order_spec(settings), settings, registry, tracing=traced("order", exporter))
        )
        await wait_ready(order)
        async with asyncio.timeout(10):
            while not all(registry.instances(name) for name, _, _ in PARTICIPANTS):
                await asyncio.sleep(0.05)
        yield Services(order, dsns)


def traced(service: str, exporter: InMemorySpanExporter) -> Tracing:
    return Tracing(service=service, instance_id=f"{service}-1", exporter=exporter, batch=False)


@pytest.fixture
def participants_log_their_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each participant's command routes write a line while handling (they write none)."""
    for module in (inventory.api, payment.api, shipping.api):
        command = module.run_command

        async def logged(*args: Any, _command: Any = command, **kwargs: Any) -> Any:
            structlog.get_logger("test").info("test.command")
            return await _command(*args, **kwargs)

        monkeypatch.setattr(module, "run_command", logged)


@pytest.fixture
def captured_logs() -> Iterator[list[dict[str, Any]]]:
    """Every structlog line, with the bound context and trace ids as a service writes them."""
    processors = [structlog.contextvars.merge_contextvars, add_trace_ids]
    with structlog.testing.capture_logs(processors=processors) as lines:
        yield lines


def service_of(span: ReadableSpan) -> str:
    return str(span.resource.attributes.get("service.name"))


def trace_hex(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


def db_name(span: ReadableSpan) -> str | None:
    attributes = span.attributes or {}
    name = attributes.get("db.name", attributes.get("db.namespace"))
    return str(name) if name is not None else None


@pytest.mark.usefixtures("participants_log_their_commands")
async def test_one_order_is_one_trace_across_the_four_services(
    rabbit_vhost: str, captured_logs: list[dict[str, Any]]
) -> None:
    exporter = InMemorySpanExporter()
    async with four_services(rabbit_vhost, exporter) as services:
        exporter.clear()  # start-up's spans (migrations, readiness) are not the order's
        placed = await services.order.post("/orders", json=ORDER)
        assert placed.status_code == 201, placed.text
        assert placed.json()["status"] == "completed", placed.json()
        order_id = placed.json()["id"]
        await asyncio.sleep(0.2)  # spans of answers still on their way end
        stored = await stored_traceparents(services.dsns)
    spans = exporter.get_finished_spans()
    (request,) = [s for s in spans if s.name == "POST /orders" and s.kind == SpanKind.SERVER]
    trace_id = trace_hex(request)
    in_trace = [s for s in spans if trace_hex(s) == trace_id]
    names = {s.name for s in in_trace}
    assert "saga place_order" in names
    steps = ("reserve_stock", "charge_payment", "create_shipment", "commit_stock")
    assert {f"forward {step}" for step in steps} <= names
    served = {(service_of(s), s.name) for s in in_trace if s.kind == SpanKind.SERVER}
    assert served >= {
        ("order", "POST /orders"),
        ("inventory", "POST /reservations"),
        ("payment", "POST /payments"),
        ("shipping", "POST /shipments"),
        ("inventory", "POST /reservations/{order_id}/commit"),
    }
    calls = [s for s in in_trace if s.kind == SpanKind.CLIENT and db_name(s) is None]
    assert len(calls) >= 4  # one per step at least, each the parent of a participant's span
    databases = {db_name(s) for s in in_trace if db_name(s) is not None}
    assert {dsn.rsplit("/", 1)[-1] for dsn in services.dsns.values()} <= databases
    # Every event written on the way carries the trace, for the relay to send along.
    assert stored, "no outbox rows"
    assert all(None not in rows for rows in stored.values()), stored
    assert {str(tp).split("-")[1] for rows in stored.values() for tp in rows} == {trace_id}
    # The lines written meanwhile lead to the trace; the participants' name the order.
    commands = [line for line in captured_logs if line["event"] == "test.command"]
    assert len(commands) == 4
    assert all(line["order_id"] == order_id for line in commands)
    assert all(line["trace_id"] == trace_id and "span_id" in line for line in commands)
    (finished,) = [line for line in captured_logs if line["event"] == "saga.finished"]
    assert (finished["saga_id"], finished["trace_id"]) == (order_id, trace_id)


async def test_an_orders_events_leave_and_arrive_in_its_trace(rabbit_vhost: str) -> None:
    # Every service relays (standalone) and order's timeline consumer applies the events: the
    # relay's send of each event and the consumer's processing of it are in the order's trace.
    exporter = InMemorySpanExporter()
    async with four_services(rabbit_vhost, exporter, relay="standalone") as services:
        exporter.clear()
        placed = await services.order.post("/orders", json=ORDER)
        assert placed.json()["status"] == "completed", placed.json()
        order_id = placed.json()["id"]
        stored = await stored_traceparents(services.dsns)
        expected = sum(len(rows) for rows in stored.values())
        # The timeline shows the order's own events; the catalogue takes product_changed.
        timeline = expected - await product_changes(services.dsns["inventory"])
        async with asyncio.timeout(15):
            while len((await services.order.get(f"/orders/{order_id}/timeline")).json()) < timeline:
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.2)  # the consumer's spans end after its commit
    spans = exporter.get_finished_spans()
    (request,) = [s for s in spans if s.name == "POST /orders" and s.kind == SpanKind.SERVER]
    in_trace = [s for s in spans if trace_hex(s) == trace_hex(request)]
    sent = [s for s in in_trace if s.name == "send ordermesh.events"]
    applied = [s for s in in_trace if s.kind == SpanKind.CONSUMER]
    # Every service's relay (the services share this process, so the span's service is in
    # its attributes rather than its resource).
    assert {(s.attributes or {}).get("ordermesh.service") for s in sent} == set(stored)
    assert len(sent) == expected
    assert len(applied) >= expected  # the timeline's (the catalogue's too, for some)


async def product_changes(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM outbox WHERE event_type = 'product_changed'"
        )
    finally:
        await conn.close()
    return count


async def stored_traceparents(dsns: dict[str, str]) -> dict[str, list[str | None]]:
    """Each service's outbox rows' stored traceparent (inventory's product_changed rows,
    written by statements of its own, included)."""
    stored = {}
    for service, dsn in dsns.items():
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT headers->>'traceparent' AS tp FROM outbox ORDER BY id")
        finally:
            await conn.close()
        stored[service] = [row["tp"] for row in rows]
    return {service: rows for service, rows in stored.items() if rows}


async def recovered_by_another_owner(
    db: Database, definition: SagaDefinition[Any], saga_id: uuid.UUID
) -> None:
    """Owner "b" starts, takes the saga over (its lease has lapsed) and runs it to its end."""
    async with SagaEngine(db.pool, owner="b", definitions=[definition], policy=FAST):
        async with asyncio.timeout(5):
            while (
                await db.pool.fetchval("SELECT status FROM sagas WHERE id = $1", saga_id)
                == "running"
            ):
                await asyncio.sleep(0.02)


def assert_continues(exporter: InMemorySpanExporter, request: Span) -> None:
    """The resumed run's saga span is a child of the request the saga was created in."""
    (resumed,) = [s for s in exporter.get_finished_spans() if s.name == "saga trip"]
    context = request.get_span_context()
    assert resumed.context is not None
    assert resumed.context.trace_id == context.trace_id
    assert resumed.parent is not None
    assert resumed.parent.span_id == context.span_id


async def test_a_saga_taken_over_after_a_crash_continues_its_stored_trace(
    fresh_database: str,
) -> None:
    """As the unit test, on Postgres: the context lives in the saga's row."""
    exporter = InMemorySpanExporter()
    world = World()
    world.hang.add("hotel")
    definition = world.definition()
    async with (
        traced("order", exporter),
        Database(fresh_database) as db,
    ):
        await db.migrate(SAGA_MIGRATIONS)
        crashed = SagaEngine(db.pool, owner="a", definitions=[definition], policy=FAST)
        await crashed.__aenter__()
        with tracer("test").start_as_current_span("POST /orders") as request:
            saga_id = uuid.uuid4()
            async with db.pool.acquire() as conn, conn.transaction():
                await crashed.create(conn, definition, saga_id, Trip("Lisbon"))
            crashed.launch(saga_id)
        async with asyncio.timeout(5):
            while "hotel" not in world.calls:
                await asyncio.sleep(0.005)
        killed = [*crashed._loops, *crashed._running.values()]
        for task in killed:
            task.cancel()  # killed: no shutdown, no handover; its lease lapses
        await asyncio.gather(*killed, return_exceptions=True)
        exporter.clear()
        world.hang.clear()
        await recovered_by_another_owner(db, definition, saga_id)
    assert_continues(exporter, request)
    steps = [s.name for s in exporter.get_finished_spans() if s.name.startswith("forward ")]
    assert steps == ["forward hotel", "forward car"]


async def test_a_saga_written_with_its_order_continues_the_trace_after_dying_unstarted(
    fresh_database: str,
) -> None:
    """The order service's path (the saga's row a CTE of the order's statement): a process
    that died between that commit and the first step leaves the trace in the row."""
    exporter = InMemorySpanExporter()
    definition = World().definition()
    async with traced("order", exporter), Database(fresh_database) as db:
        await db.migrate(SAGA_MIGRATIONS)
        died = SagaEngine(db.pool, owner="a", definitions=[definition], policy=FAST)
        with tracer("test").start_as_current_span("POST /orders") as request:
            saga_id = uuid.uuid4()
            prepared = died.prepare(definition, saga_id, Trip("Lisbon"))
            ctes, args = prepared.ctes("header", 1)
            await db.pool.execute(f"WITH header AS (SELECT 1), {ctes} SELECT 1", *args)
        await db.pool.execute("UPDATE sagas SET lease_until = now() - interval '1 s'")
        exporter.clear()
        await recovered_by_another_owner(db, definition, saga_id)
    assert_continues(exporter, request)
