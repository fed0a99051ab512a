"""A service's background work under outages: its supervised loops show in readiness, and a
broker outage is reported there without withdrawing the instance from the registry (HTTP
work goes on; the outbox holds the events)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from payment.app import SPEC as PAYMENT
from payment.app import PaymentSettings

from tests.support.apps import running, wait_ready
from tests.support.fakes import InMemoryRegistry
from tests.support.rabbitmq import PrivateRabbit

pytestmark = pytest.mark.integration


async def readiness_until(
    client: httpx.AsyncClient, wanted: Any, *, within: float = 20.0
) -> httpx.Response:
    """Poll /health/ready until ``wanted(response)``; returns that response."""
    async with asyncio.timeout(within):
        while not wanted(response := await client.get("/health/ready")):
            await asyncio.sleep(0.05)
    return response


async def test_a_broker_outage_is_reported_but_keeps_the_instance_registered(
    fresh_database: str, private_rabbit: PrivateRabbit
) -> None:
    registry = InMemoryRegistry()
    settings = PaymentSettings(
        database_url=fresh_database,
        rabbitmq_url=f"{private_rabbit.url}?reconnect_interval=0.3",
        port=18160,
        outbox_relay="standalone",
    )
    async with running(PAYMENT, settings, registry) as client:
        body = await wait_ready(client)
        loops = body["details"]["background"]
        assert {"presence", "outbox-monitor", "outbox-relay"} <= set(loops)
        assert {loop["state"] for loop in loops.values()} == {"running"}
        async with asyncio.timeout(10):
            while not registry.instances("payment"):
                await asyncio.sleep(0.05)

        await asyncio.to_thread(private_rabbit.stop)
        down = await readiness_until(client, lambda r: r.json()["checks"]["rabbitmq"] != "ok")
        assert down.status_code == 200, down.text
        assert down.json()["status"] == "degraded"
        assert down.json()["checks"]["database"] == "ok"
        # The presence loop goes on announcing the instance while the broker is away.
        announced = registry.register_calls
        async with asyncio.timeout(10):
            while registry.register_calls < announced + 2:
                await asyncio.sleep(0.05)
        assert len(registry.instances("payment")) == 1
        assert (await client.get("/customers")).status_code < 500  # HTTP work goes on

        await asyncio.to_thread(private_rabbit.start)
        back = await readiness_until(client, lambda r: r.json()["status"] == "ok")
        assert back.json()["checks"]["rabbitmq"] == "ok"
    assert registry.instances("payment") == ()


class _BrokenRegistry(InMemoryRegistry):
    """A registry client with a bug: registering raises what no loop treats as transient."""

    async def register(self, instance: Any) -> None:
        raise RuntimeError("bug in the registry client")


async def test_a_loop_that_keeps_dying_makes_the_instance_unready_after_loop_grace(
    fresh_database: str, rabbit_vhost: str
) -> None:
    """LOOP_GRACE reaches the supervisor: 0.5 s here, against 10 s by default (the poll
    below gives up long before that)."""
    settings = PaymentSettings(
        database_url=fresh_database,
        rabbitmq_url=rabbit_vhost,
        port=18161,
        outbox_relay="off",
        loop_grace=0.5,
    )
    async with running(PAYMENT, settings, _BrokenRegistry()) as client:
        await wait_ready(client)  # the loop dies at its first registration, once ready
        down = await readiness_until(
            client, lambda r: r.json()["checks"]["background"] != "ok", within=5.0
        )
    assert down.status_code == 503
    presence = down.json()["details"]["background"]["presence"]
    assert presence["restarts"] >= 1
    assert "bug in the registry client" in presence["last_error"]
