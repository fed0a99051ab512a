"""The order timeline: the events each order caused across the services, from the event stream.

The order service consumes every event (``#``) into ``order_timeline`` through the shared
consumer (inbox, ack after commit), so ``GET /orders/{id}/timeline`` shows, for example::

    order.created -> inventory.stock_reserved -> payment.charged -> shipping.shipment_created
    -> inventory.stock_committed -> order.completed

Every service keys its events by the order id (as the aggregate id, or ``order_id`` in the
payload); an event that names no order is acknowledged and skipped.

>>> spec = ServiceSpec(..., routers=[router, timeline_router], setup=...)
>>> start_timeline(ctx)        # in the order service's setup hook
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
import structlog
from fastapi import APIRouter
from ordermesh_shared.bootstrap import Ctx, ServiceContext
from ordermesh_shared.database import DbConn
from ordermesh_shared.errors import NotFound
from ordermesh_shared.messaging.consumer import ConsumerMetrics, EventConsumer, Subscription
from ordermesh_shared.messaging.envelope import Event
from ordermesh_shared.messaging.wiring import start_consumer
from pydantic import BaseModel, Field

from order import store

log = structlog.get_logger(__name__)

TIMELINE_QUEUE = "order.timeline"

timeline_router = APIRouter(tags=["orders"])


class TimelineEntry(BaseModel):
    """One event an order caused."""

    event_id: str
    service: str = Field(examples=["payment"])
    event_type: str = Field(examples=["charged"])
    routing_key: str = Field(examples=["payment.charged"])
    occurred_at: datetime | None = Field(description="When the emitting transaction ran.")
    received_at: datetime
    data: dict[str, Any]


def order_id_of(event: Event) -> uuid.UUID | None:
    """The order an event belongs to, if it names one."""
    for candidate in (event.data.get("order_id"), event.aggregate_id):
        try:
            return uuid.UUID(str(candidate))
        except ValueError:
            continue
    return None


async def record_timeline_event(conn: DbConn, event: Event) -> None:
    """The consumer's handler: one timeline row per event, in the inbox's transaction."""
    await record_timeline_events(conn, [event])


async def record_timeline_events(conn: DbConn, events: Sequence[Event]) -> None:
    """A batch's timeline rows in one statement (in a transaction of the caller's)."""
    sql, args = _timeline_rows(events, first=1, where="true")
    if args:
        await conn.execute(sql, *args)


def timeline_statement(events: Sequence[Event]) -> tuple[str, Sequence[Any]]:
    """The consumer's batch statement: the rows of the events the inbox CTE ``fresh`` let
    through (parameters from $5; see ``Subscription.batch_statement``)."""
    sql, args = _timeline_rows(events, first=5, where="e.i IN (SELECT message_id FROM fresh)")
    return (sql, args) if args else ("SELECT 1", ())


def _timeline_rows(events: Sequence[Event], *, first: int, where: str) -> tuple[str, list[Any]]:
    rows = [(order_id, event) for event in events if (order_id := _order_of(event)) is not None]
    if not rows:
        return "", []
    n = [f"${first + i}" for i in range(8)]
    sql = (
        "INSERT INTO order_timeline (event_id, order_id, service, event_type, aggregate_type,"
        " sequence, occurred_at, data)"
        f" SELECT i, o, s, t, a, q, w, d::jsonb FROM unnest({n[0]}::text[], {n[1]}::uuid[],"
        f"   {n[2]}::text[], {n[3]}::text[], {n[4]}::text[], {n[5]}::bigint[],"
        f"   {n[6]}::timestamptz[], {n[7]}::text[]) AS e(i, o, s, t, a, q, w, d)"
        # A row already there (its inbox row pruned, the event redelivered): kept as it is.
        f" WHERE {where} ON CONFLICT (event_id) DO NOTHING"
    )
    return sql, [
        [event.id for _, event in rows],
        [order_id for order_id, _ in rows],
        [event.service for _, event in rows],
        [event.event_type for _, event in rows],
        [event.aggregate_type for _, event in rows],
        [event.sequence for _, event in rows],
        [event.time for _, event in rows],
        [orjson.dumps(event.data).decode() for _, event in rows],
    ]


def _order_of(event: Event) -> uuid.UUID | None:
    order_id = order_id_of(event)
    if order_id is None:
        log.debug("timeline.no_order", event_id=event.id, type=event.type)
    return order_id


def timeline_subscription() -> Subscription:
    """Every event of every service (the timeline wants them all)."""
    # Two lanes, not the default eight: inserts are cheap and a busy lane's batches grow
    # (one commit for many events), where eight lanes would each commit nearly every event.
    return Subscription(
        TIMELINE_QUEUE,
        ["#"],
        record_timeline_event,
        batch_statement=timeline_statement,
        concurrency=2,
    )


def start_timeline(ctx: ServiceContext, metrics: ConsumerMetrics) -> EventConsumer:
    """Consume the stream into the timeline for the life of the service."""
    return start_consumer(ctx.db, ctx.broker, ctx.tasks, metrics, timeline_subscription())


@timeline_router.get(
    "/orders/{order_id}/timeline", responses={404: {"description": "No such order."}}
)
async def get_timeline(order_id: uuid.UUID, ctx: Ctx) -> list[TimelineEntry]:
    """The events this order caused across the services, oldest first."""
    async with ctx.db.pool.acquire() as conn:
        if await store.get_order(conn, order_id) is None:
            raise NotFound(f"order {order_id} not found")
        rows = await conn.fetch(
            "SELECT event_id, service, event_type, occurred_at, received_at, data::text AS data"
            " FROM order_timeline WHERE order_id = $1"
            " ORDER BY occurred_at NULLS LAST, received_at, sequence",
            order_id,
        )
    return [_entry(row) for row in rows]


def _entry(row: Any) -> TimelineEntry:
    return TimelineEntry(
        event_id=row["event_id"],
        service=row["service"],
        event_type=row["event_type"],
        routing_key=f"{row['service']}.{row['event_type']}",
        occurred_at=row["occurred_at"],
        received_at=row["received_at"],
        data=orjson.loads(row["data"]),
    )
