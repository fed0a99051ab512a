"""The saga's time budgets are its own: a client's short ``X-Deadline-Ms`` bounds only how
long ``POST /orders`` waits for its answer, never the saga it started.

The order service runs in-process on a real Postgres and RabbitMQ; the participants are one
aiohttp server on loopback (tests/support/participants.py), with payment answering in 400 ms.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from order.app import OrderSettings, order_spec
from order.app_state import order_runtime

from tests.support.apps import running, wait_ready
from tests.support.fakes import InMemoryRegistry
from tests.support.participants import FakeParticipants

pytestmark = pytest.mark.integration

PAYMENT_TAKES = 0.4


async def wait_terminal(client: Any, location: str) -> dict[str, Any]:
    async with asyncio.timeout(15):
        while True:
            order: dict[str, Any] = (await client.get(location)).json()
            if order["status"] in ("completed", "cancelled", "compensation_failed"):
                return order
            await asyncio.sleep(0.05)


async def test_a_300ms_request_deadline_does_not_bound_the_saga(
    fresh_database: str, rabbit_vhost: str
) -> None:
    registry = InMemoryRegistry()
    participants = FakeParticipants(payment_delay=PAYMENT_TAKES)
    settings = OrderSettings(
        database_url=fresh_database,
        rabbitmq_url=rabbit_vhost,
        port=18150,
        outbox_relay="off",
        order_wait=5.0,
    )
    async with (
        participants.serving(registry),
        running(order_spec(settings), settings, registry) as client,
    ):
        await wait_ready(client)
        placed = await client.post(
            "/orders",
            json={
                "customer_id": "alice",
                "items": [{"sku": "KB-101", "quantity": 1}],
                "destination": "DE",
            },
            headers={"X-Deadline-Ms": "300"},
        )
        # Answered within the caller's deadline: still running, follow Location.
        assert placed.status_code == 202, placed.text
        order = await wait_terminal(client, placed.headers["Location"])
        metrics = (await client.get("/metrics")).text
    assert order["status"] == "completed", order
    # The saga's own series are served with the service's.
    assert 'sagas_finished_total{saga="place_order",status="completed",step=""} 1.0' in metrics
    steps = {(s["step"], s["direction"]): s for s in order["steps"]}
    assert steps[("charge_payment", "forward")]["attempts"] == 1
    assert participants.calls.count("POST /payments") == 1


async def test_a_replay_answers_at_once_and_leaves_nothing_behind(
    fresh_database: str, rabbit_vhost: str
) -> None:
    """A replayed Idempotency-Key of an order that ended answers at once, not after the full
    ORDER_WAIT (30 s here), and no per-order wait state outlives the requests."""
    registry = InMemoryRegistry()
    settings = OrderSettings(
        database_url=fresh_database,
        rabbitmq_url=rabbit_vhost,
        port=18151,
        outbox_relay="off",
        order_wait=30.0,
    )
    body = {
        "customer_id": "alice",
        "items": [{"sku": "KB-101", "quantity": 1}],
        "destination": "DE",
    }
    key = {"Idempotency-Key": f"replay-{uuid.uuid4()}"}
    async with (
        FakeParticipants(payment_delay=PAYMENT_TAKES).serving(registry),
        running(order_spec(settings), settings, registry) as client,
    ):
        await wait_ready(client)
        async with asyncio.timeout(10):
            placed = await client.post("/orders", json=body, headers=key)
        assert placed.status_code == 201, placed.text
        for _ in range(3):
            async with asyncio.timeout(3):  # far under ORDER_WAIT
                replayed = await client.post("/orders", json=body, headers=key)
            assert replayed.status_code == 200, replayed.text
            assert replayed.json()["id"] == placed.json()["id"]
        order_id = uuid.UUID(placed.json()["id"])
        engine = order_runtime(client.app_context).engine  # type: ignore[attr-defined]
        held = [
            name
            for name, value in vars(engine).items()
            if isinstance(value, dict | set) and order_id in value
        ]
        assert held == [], f"the engine still keeps {order_id} in {held}"


async def test_a_commit_whose_answers_are_lost_past_the_deadline_still_completes(
    fresh_database: str, rabbit_vhost: str
) -> None:
    """commit_stock comes after the pivot (the shipment): answers lost for longer than the
    saga's forward deadline are retried until one arrives; nothing is refunded or released."""
    registry = InMemoryRegistry()
    participants = FakeParticipants(payment_delay=PAYMENT_TAKES)
    settings = OrderSettings(
        database_url=fresh_database,
        rabbitmq_url=rabbit_vhost,
        port=18152,
        outbox_relay="off",
        order_wait=0.5,
        saga_deadline=1.0,
        saga_step_timeout=0.6,
    )
    participants.commit_lost_until = asyncio.get_running_loop().time() + 3.5
    async with (
        participants.serving(registry),
        running(order_spec(settings), settings, registry) as client,
    ):
        await wait_ready(client)
        placed = await client.post(
            "/orders",
            json={
                "customer_id": "alice",
                "items": [{"sku": "KB-101", "quantity": 1}],
                "destination": "DE",
            },
        )
        assert placed.status_code == 202, placed.text
        order = await wait_terminal(client, placed.headers["Location"])
    assert order["status"] == "completed", order
    commit = next(s for s in order["steps"] if s["step"] == "commit_stock")
    assert commit["attempts"] >= 3, commit
    undone = [c for c in participants.calls if c.endswith(("/refund", "/release", "/cancel"))]
    assert undone == []
