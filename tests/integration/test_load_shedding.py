"""Load shedding: an order instance runs at most MAX_IN_FLIGHT_SAGAS sagas; beyond that
``POST /orders`` answers 429 with ``Retry-After`` and creates nothing, instead of queueing
orders into their deadlines and compensations.

The order service runs in-process on a real Postgres and RabbitMQ; the participants are one
aiohttp server on loopback whose payment endpoint is held until the test lets it go, so the
sagas stay in flight as long as the test needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from order.app import OrderSettings, order_spec

from tests.support.apps import running, wait_ready
from tests.support.fakes import InMemoryRegistry
from tests.support.participants import FakeParticipants

pytestmark = pytest.mark.integration

LIMIT = 2


@asynccontextmanager
async def order_app(
    database: str, vhost: str, *, port: int
) -> AsyncIterator[tuple[httpx.AsyncClient, FakeParticipants]]:
    """The order app with MAX_IN_FLIGHT_SAGAS=LIMIT, its participants held."""
    registry = InMemoryRegistry()
    participants = FakeParticipants(hold_payments=True)
    settings = OrderSettings(
        database_url=database,
        rabbitmq_url=vhost,
        port=port,
        outbox_relay="off",
        order_wait=0.2,  # a held saga answers 202 quickly
        max_in_flight_sagas=LIMIT,
    )
    async with (
        participants.serving(registry),
        running(order_spec(settings), settings, registry) as client,
    ):
        await wait_ready(client)
        yield client, participants


def order_body(customer: str = "alice") -> dict[str, Any]:
    return {
        "customer_id": customer,
        "items": [{"sku": "KB-101", "quantity": 1}],
        "destination": "DE",
    }


async def order_count(database: str) -> int:
    conn = await asyncpg.connect(database)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM orders")
        return count
    finally:
        await conn.close()


async def wait_terminal(client: httpx.AsyncClient, location: str) -> str:
    async with asyncio.timeout(15):
        while True:
            status: str = (await client.get(location)).json()["status"]
            if status in ("completed", "cancelled", "compensation_failed"):
                return status
            await asyncio.sleep(0.05)


async def hold_limit(client: httpx.AsyncClient, participants: FakeParticipants) -> list[str]:
    """LIMIT orders whose sagas wait at payment; their Locations."""
    locations = []
    for n in range(LIMIT):
        placed = await client.post(
            "/orders", json=order_body(), headers={"Idempotency-Key": f"held-{n}"}
        )
        assert placed.status_code == 202, placed.text
        locations.append(placed.headers["Location"])
    async with asyncio.timeout(5):
        while participants.payments < LIMIT:
            await asyncio.sleep(0.02)
    return locations


async def test_beyond_the_limit_an_order_is_shed_with_retry_after_and_leaves_no_row(
    fresh_database: str, rabbit_vhost: str
) -> None:
    async with order_app(fresh_database, rabbit_vhost, port=18160) as (client, participants):
        held = await hold_limit(client, participants)
        before = await order_count(fresh_database)

        shed = await client.post("/orders", json=order_body("bob"))

        assert shed.status_code == 429, shed.text
        assert int(shed.headers["Retry-After"]) >= 1
        assert shed.json()["reason"] == "overloaded"
        assert "Location" not in shed.headers
        assert await order_count(fresh_database) == before == LIMIT
        assert participants.payments == LIMIT  # no saga started for it either
        metrics = (await client.get("/metrics")).text
        assert "order_placements_shed_total 1.0" in metrics

        participants.release.set()
        assert [await wait_terminal(client, loc) for loc in held] == ["completed"] * LIMIT
        accepted = await client.post("/orders", json=order_body("bob"))
        assert accepted.status_code == 201, accepted.text
        assert accepted.json()["status"] == "completed"


async def test_a_replayed_key_is_answered_during_overload(
    fresh_database: str, rabbit_vhost: str
) -> None:
    async with order_app(fresh_database, rabbit_vhost, port=18161) as (client, participants):
        done = await client.post("/orders", json=order_body(), headers={"Idempotency-Key": "early"})
        participants.release.set()
        assert await wait_terminal(client, done.headers["Location"]) == "completed"
        participants.release.clear()
        await hold_limit(client, participants)

        replayed = await client.post(
            "/orders", json=order_body(), headers={"Idempotency-Key": "early"}
        )
        still_running = await client.post(
            "/orders", json=order_body(), headers={"Idempotency-Key": "held-0"}
        )
        reused = await client.post(
            "/orders", json=order_body("bob"), headers={"Idempotency-Key": "early"}
        )

        assert replayed.status_code == 200, replayed.text
        assert replayed.json()["id"] == done.json()["id"]
        assert still_running.status_code == 202, still_running.text
        assert reused.status_code == 422, reused.text  # a reused key is still told so
        assert await order_count(fresh_database) == 1 + LIMIT


async def test_concurrent_orders_past_the_limit_are_shed_not_let_through_together(
    fresh_database: str, rabbit_vhost: str
) -> None:
    """Requests that all arrive before any saga is launched still count against the limit."""
    async with order_app(fresh_database, rabbit_vhost, port=18162) as (client, _):
        answers = await asyncio.gather(
            *(client.post("/orders", json=order_body()) for _ in range(4 * LIMIT))
        )
        codes = sorted(a.status_code for a in answers)
        assert codes == [202] * LIMIT + [429] * (3 * LIMIT), [a.text for a in answers]
        assert await order_count(fresh_database) == LIMIT
