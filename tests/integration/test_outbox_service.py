"""The outbox inside a service app (the shared bootstrap): relay, lag in readiness and metrics,
and the quarantine admin endpoints behind X-Admin-Token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import httpx
import pytest
from asgi_lifespan import LifespanManager
from inventory.app import SPEC, InventorySettings
from ordermesh_shared.bootstrap import ServiceContext, create_service_app
from ordermesh_shared.outbox import add_event
from ordermesh_shared.outbox.wiring import relay_mode

from tests.support.fakes import InMemoryRegistry

pytestmark = pytest.mark.integration

ADMIN = {"X-Admin-Token": "test-admin"}


class StandaloneInventorySettings(InventorySettings):
    """Inventory with the relay running without etcd (one instance, as in this test)."""

    outbox_relay: str = "standalone"


@asynccontextmanager
async def service(dsn: str, amqp_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    settings = StandaloneInventorySettings(
        database_url=dsn, rabbitmq_url=amqp_url, port=18101, admin_token="test-admin"
    )
    app = create_service_app(SPEC, settings, registry_factory=lambda _s: InMemoryRegistry())
    async with LifespanManager(app, startup_timeout=10, shutdown_timeout=10) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            await _wait_ready(client)
            yield client, app.state.ctx


async def _wait_ready(client: httpx.AsyncClient) -> None:
    async with asyncio.timeout(10):
        while (await client.get("/health/ready")).status_code != 200:
            await asyncio.sleep(0.05)


async def commit_event(ctx: ServiceContext, event_type: str, *, attempts: int = 0) -> str:
    async with ctx.db.pool.acquire() as conn, conn.transaction():
        event_id = await add_event(
            conn,
            aggregate_type="reservation",
            aggregate_id="o-1",
            event_type=event_type,
            payload={"order_id": "o-1"},
        )
        # A row that already failed this often: its next failure quarantines it.
        await conn.execute(
            "UPDATE outbox SET attempts = $1 WHERE event_id = $2", attempts, event_id
        )
    return str(event_id)


async def bind_queue(amqp_url: str, routing_key: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange("ordermesh.events", "topic", durable=True)
        queue = await channel.declare_queue("inventory.watch", durable=True)
        await queue.bind(exchange, routing_key)


async def outbox_detail(client: httpx.AsyncClient) -> dict[str, Any]:
    body = (await client.get("/health/ready")).json()
    detail: dict[str, Any] = body["details"]["outbox"]
    return detail


async def test_quarantine_shows_in_readiness_metrics_and_admin_and_can_be_redriven(
    fresh_database: str, rabbit_vhost: str
) -> None:
    await bind_queue(rabbit_vhost, "inventory.stock_reserved")
    async with service(fresh_database, rabbit_vhost) as (client, ctx):
        poison = await commit_event(ctx, "stock_unknown", attempts=9)  # nothing is bound to it
        held = await commit_event(ctx, "stock_reserved")  # same aggregate: waits behind it
        async with asyncio.timeout(10):
            while (await outbox_detail(client))["quarantined"] != 1:
                await asyncio.sleep(0.1)

        assert (await client.get("/admin/outbox/quarantined")).status_code == 401
        wrong = {"X-Admin-Token": "nope"}
        assert (await client.get("/admin/outbox/quarantined", headers=wrong)).status_code == 403
        listed = (await client.get("/admin/outbox/quarantined", headers=ADMIN)).json()
        assert [(q["event_id"], q["attempts"], q["held_behind"]) for q in listed] == [
            (poison, 10, 1)
        ]
        assert "NO_ROUTE" in listed[0]["last_error"]
        detail = await outbox_detail(client)
        assert (detail["pending"], detail["quarantined"]) == (2, 1)  # the held one waits too
        metrics = (await client.get("/metrics")).text
        assert "outbox_quarantined_events 1.0" in metrics
        assert "outbox_events_quarantined_total 1.0" in metrics
        assert "outbox_relay_leader 1.0" in metrics

        await bind_queue(rabbit_vhost, "inventory.stock_unknown")
        redriven = await client.post(
            "/admin/outbox/quarantined/redrive", json={"event_ids": [poison]}, headers=ADMIN
        )
        assert redriven.json() == {"redriven": [poison]}
        async with asyncio.timeout(10):
            while (await outbox_detail(client))["pending"] != 0:
                await asyncio.sleep(0.1)
    assert held  # published after the poison row, in order


async def test_redrive_refuses_unknown_fields(fresh_database: str, rabbit_vhost: str) -> None:
    async with service(fresh_database, rabbit_vhost) as (client, _ctx):
        answer = await client.post(
            "/admin/outbox/quarantined/redrive", json={"ids": []}, headers=ADMIN
        )
        assert answer.status_code == 422


def test_relay_mode_defaults_to_elected_and_refuses_nonsense() -> None:
    assert relay_mode(InventorySettings()) == "elected"
    assert relay_mode(StandaloneInventorySettings()) == "standalone"

    class Typo(InventorySettings):
        outbox_relay: str = "sometimes"

    with pytest.raises(ValueError, match="OUTBOX_RELAY='sometimes'"):
        relay_mode(Typo())
