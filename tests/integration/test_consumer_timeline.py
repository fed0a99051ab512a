"""The order timeline consumer: events of every service about an order, through the shared
consumer and inbox, served by ``GET /orders/{id}/timeline``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import aio_pika.exceptions
import httpx
import pytest
from asgi_lifespan import LifespanManager
from order.app import MIGRATIONS, OrderSettings
from order.timeline import start_timeline, timeline_router
from ordermesh_shared.bootstrap import ServiceContext, ServiceSpec, create_service_app
from ordermesh_shared.messaging.consumer import ConsumerMetrics
from ordermesh_shared.messaging.envelope import OutgoingEvent, encode_event
from ordermesh_shared.messaging.topology import Topology, declare_events_exchange

from tests.support.fakes import InMemoryRegistry

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


class TimelineSettings(OrderSettings):
    outbox_relay: str = "off"  # this test publishes the other services' events itself


@asynccontextmanager
async def _start_timeline(ctx: ServiceContext) -> AsyncIterator[None]:
    start_timeline(ctx, ConsumerMetrics(ctx.metrics.registry))
    yield


SPEC = ServiceSpec(
    name="order",
    title="order (timeline only)",
    migrations=MIGRATIONS,
    routers=[timeline_router],
    setup=_start_timeline,
)


def event(service_aggregate: str, event_type: str, order_id: uuid.UUID, n: int) -> OutgoingEvent:
    return OutgoingEvent(
        id=uuid.uuid4(),
        sequence=n,
        aggregate_type=service_aggregate,
        aggregate_id=str(order_id),
        event_type=event_type,
        payload={"order_id": str(order_id), "n": n},
        created_at=T0 + timedelta(milliseconds=10 * n),
    )


async def test_timeline_shows_each_event_once_in_order(
    fresh_database: str, rabbit_vhost: str
) -> None:
    order_id = uuid.uuid4()
    flow: list[tuple[str, str, str]] = [
        ("order", "order", "created"),
        ("inventory", "reservation", "stock_reserved"),
        ("payment", "payment", "charged"),
        ("shipping", "shipment", "shipment_created"),
        ("order", "order", "completed"),
    ]
    settings = TimelineSettings(database_url=fresh_database, rabbitmq_url=rabbit_vhost, port=18100)
    app = create_service_app(SPEC, settings, registry_factory=lambda _s: InMemoryRegistry())
    async with LifespanManager(app, startup_timeout=10, shutdown_timeout=10) as manager:
        ctx: ServiceContext = app.state.ctx
        await _order_exists(ctx, order_id)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://o"
        )
        async with client, await aio_pika.connect(rabbit_vhost) as connection:
            channel = await connection.channel(on_return_raises=True)
            exchange = await declare_events_exchange(channel, Topology())
            messages = [
                (
                    encode_event(event(aggregate, kind, order_id, n), service=service),
                    f"{service}.{kind}",
                )
                for n, (service, aggregate, kind) in enumerate(flow, start=1)
            ]
            await _publish_when_bound(exchange, *messages[0])
            for message, key in [*messages[1:], messages[2]]:  # one redelivered: a duplicate
                await exchange.publish(message, key)
            timeline = await _timeline_of(client, order_id, len(flow))
            unknown = await client.get(f"/orders/{uuid.uuid4()}/timeline")
    assert [entry["routing_key"] for entry in timeline] == [
        "order.created",
        "inventory.stock_reserved",
        "payment.charged",
        "shipping.shipment_created",
        "order.completed",
    ]
    assert timeline[2]["data"] == {"order_id": str(order_id), "n": 3}
    assert unknown.status_code == 404


async def _order_exists(ctx: ServiceContext, order_id: uuid.UUID) -> None:
    async with asyncio.timeout(10):
        while not ctx.db.migrated:
            await asyncio.sleep(0.05)
    async with ctx.db.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO orders (id, customer_id, destination, status)"
            " VALUES ($1, 'alice', 'DE', 'pending')",
            order_id,
        )


async def _publish_when_bound(exchange: Any, message: aio_pika.Message, key: str) -> None:
    """Publish once the timeline queue is bound: until then the broker returns it."""
    async with asyncio.timeout(10):
        while True:
            try:
                await exchange.publish(message, key)
                return
            except aio_pika.exceptions.PublishError:
                await asyncio.sleep(0.05)


async def _timeline_of(client: httpx.AsyncClient, order_id: uuid.UUID, count: int) -> list[Any]:
    async with asyncio.timeout(10):
        while True:
            timeline: list[Any] = (await client.get(f"/orders/{order_id}/timeline")).json()
            if len(timeline) >= count:
                break
            await asyncio.sleep(0.05)
        # Until the redelivered copy was handled (acknowledged as a duplicate): a second
        # entry for it could only show up before that.
        while 'outcome="duplicate"' not in (await client.get("/metrics")).text:
            await asyncio.sleep(0.05)
    return list((await client.get(f"/orders/{order_id}/timeline")).json())
