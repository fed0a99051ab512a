"""A database that restarts or goes away: routes that need it answer 503 with Retry-After."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import httpx
import pytest
from inventory.app import SPEC as INVENTORY
from inventory.app import InventorySettings
from order.app import OrderSettings, order_spec
from payment.app import SPEC as PAYMENT
from payment.app import PaymentSettings

from tests.support.apps import running, wait_ready
from tests.support.fakes import InMemoryRegistry
from tests.support.pg_proxy import PgProxy

pytestmark = pytest.mark.integration

Call = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


async def _place_order(client: httpx.AsyncClient) -> httpx.Response:
    order = {
        "customer_id": "alice",
        "items": [{"sku": "KB-101", "quantity": 1}],
        "destination": "DE",
    }
    return await client.post("/orders", json=order)


async def _charge(client: httpx.AsyncClient) -> httpx.Response:
    charge = {"order_id": str(uuid.uuid4()), "customer_id": "alice", "amount": "1.00"}
    return await client.post("/payments", json=charge, headers={"Idempotency-Key": "k-1"})


def _assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert "database unavailable" in response.json()["detail"]


async def _outage_answers_503(client: httpx.AsyncClient, proxy: PgProxy, call: Call) -> None:
    await wait_ready(client)
    proxy.play_starting_up()  # asyncpg: CannotConnectNowError, "starting up"
    _assert_unavailable(await call(client))
    _assert_unavailable(await call(client))  # and again on a pool that has reconnected
    await proxy.refuse()  # connection refused
    _assert_unavailable(await call(client))


async def test_order_answers_503_while_its_database_restarts(fresh_database: str) -> None:
    async with PgProxy(fresh_database) as proxy:
        settings = OrderSettings(database_url=proxy.dsn)
        async with running(order_spec(settings), settings, InMemoryRegistry()) as client:
            await _outage_answers_503(client, proxy, _place_order)


async def test_inventory_answers_503_while_its_database_restarts(fresh_database: str) -> None:
    async with PgProxy(fresh_database) as proxy:
        settings = InventorySettings(database_url=proxy.dsn)
        async with running(INVENTORY, settings, InMemoryRegistry()) as client:
            await _outage_answers_503(client, proxy, lambda c: c.get("/products/KB-101"))


async def test_payment_answers_503_while_its_database_restarts(fresh_database: str) -> None:
    async with PgProxy(fresh_database) as proxy:
        settings = PaymentSettings(database_url=proxy.dsn)
        async with running(PAYMENT, settings, InMemoryRegistry()) as client:
            await _outage_answers_503(client, proxy, _charge)
