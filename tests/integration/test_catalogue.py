"""The catalogue replica (issue 19, item 1): inventory's product facts reach order's
``GET /catalogue`` through the outbox and the inbox, once and in order; a cold replica fills
from inventory's snapshot while events flow; ``POST /orders`` quotes from it, refuses unknown
SKUs once it is filled, and records what inventory took when the price had moved.

The four services run in-process on their own databases; the participants serve real HTTP
on loopback ports, so order reads the snapshot and reserves through the real ServiceClient.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aio_pika
import aio_pika.exceptions
import httpx
import pytest
from inventory.app import SPEC as INVENTORY
from inventory.app import InventorySettings
from order.app import OrderSettings, order_spec
from order.app_state import order_runtime
from order.catalogue import CATALOGUE_QUEUE, CatalogueView
from ordermesh_shared.bootstrap import ServiceSpec
from ordermesh_shared.config import ServiceSettings
from ordermesh_shared.messaging.envelope import OutgoingEvent, encode_event
from ordermesh_shared.messaging.topology import (
    Topology,
    declare_consumer_queue,
    declare_events_exchange,
)
from payment.app import SPEC as PAYMENT
from payment.app import PaymentSettings
from shipping.app import SPEC as SHIPPING
from shipping.app import ShippingSettings

from tests.support.apps import context_of, running, wait_ready
from tests.support.fakes import InMemoryRegistry
from tests.support.http_serving import loopback_socket, serving
from tests.support.postgres import database_for_the_stack

pytestmark = pytest.mark.integration

ADMIN = "catalogue-test-admin"
# A relay in each service (no etcd election here); long timers stay out of the way.
COMMON: dict[str, Any] = {
    "outbox_relay": "standalone",
    "db_pool_max": 3,
    "prune_interval": 86400.0,
    "admin_token": ADMIN,
}
KB = "KB-101"
ORDER = {"customer_id": "alice", "items": [{"sku": KB, "quantity": 1}], "destination": "DE"}
WITHIN = 15.0  # seconds a change may take to reach the replica here


@dataclass
class Stack:
    order: httpx.AsyncClient
    inventory: httpx.AsyncClient
    registry: InMemoryRegistry

    @property
    def view(self) -> CatalogueView:
        return order_runtime(context_of(self.order)).catalogue

    async def set_price(self, sku: str, price: str) -> dict[str, Any]:
        answer = await self.inventory.put(
            f"/products/{sku}/price", json={"price": price}, headers={"X-Admin-Token": ADMIN}
        )
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body


# -- the tests -------------------------------------------------------------------------------


async def test_a_price_change_reaches_the_catalogue_and_an_order_records_the_drift(
    rabbit_vhost: str,
) -> None:
    # The instance's copy is refreshed by hand here, so the order below is quoted stale.
    async with services(rabbit_vhost, catalogue_refresh=60) as stack:
        before = await catalogue_entry(stack.order, KB, lambda p: p["price"] == "89.00")
        await stack.view.refresh()
        await stack.set_price(KB, "95.00")
        after = await catalogue_entry(stack.order, KB, lambda p: p["price"] == "95.00")
        placed = await stack.order.post("/orders", json=ORDER)
        await stack.view.refresh()
        again = await stack.order.post("/orders", json=ORDER)
    assert after["product"]["version"] > before["product"]["version"]
    staleness = after["staleness"]
    assert staleness["filled"]
    assert staleness["last_event_at"] is not None
    assert 0 <= staleness["lag_seconds"] < WITHIN
    order = placed.json()
    assert placed.status_code == 201, order
    assert order["status"] == "completed", order
    assert order["items"][0]["quoted_price"] == "89.00"
    assert order["items"][0]["unit_price"] == "95.00"
    assert order["total"] == "95.00"  # inventory's price is the one taken and charged
    assert order["price_changes"] == [
        {"sku": KB, "quoted_price": "89.00", "unit_price": "95.00", "difference": "6.00"}
    ]
    assert again.json()["price_changes"] == []
    assert again.json()["items"][0]["quoted_price"] == "95.00"


async def test_an_unknown_sku_is_refused_once_the_replica_is_filled(rabbit_vhost: str) -> None:
    async with services(rabbit_vhost) as stack:
        await catalogue_entry(stack.order, KB, lambda p: True)
        await stack.view.refresh()
        unknown = {**ORDER, "items": [{"sku": "NOPE-1", "quantity": 1}]}
        refused = await stack.order.post("/orders", json=unknown)
        orders = (await stack.order.get("/orders")).json()["orders"]
        missing = await stack.order.get("/catalogue/NOPE-1")
    assert refused.status_code == 422, refused.text
    assert refused.json()["reason"] == "unknown_sku"
    assert "NOPE-1" in refused.json()["detail"]
    assert orders == []  # nothing was created
    assert missing.status_code == 404


async def test_order_starts_without_inventory_and_fills_when_it_comes(rabbit_vhost: str) -> None:
    registry = InMemoryRegistry()
    async with AsyncExitStack() as stack:
        order = await start_order(stack, rabbit_vhost, registry, catalogue_refresh=0.1)
        await wait_ready(order)  # ready with inventory nowhere
        cold = (await order.get("/catalogue")).json()
        unknown = {**ORDER, "items": [{"sku": "NEW-1", "quantity": 1}]}
        accepted = await order.post("/orders", json=unknown, headers={"X-Deadline-Ms": "300"})
        await participant(stack, INVENTORY, InventorySettings, rabbit_vhost, registry)
        filled = await catalogue_entry(order, KB, lambda p: True)
    assert cold["staleness"]["filled"] is False
    assert cold["products"] == []
    assert accepted.status_code == 202, accepted.text  # cold: inventory decides
    assert filled["staleness"]["filled"] is True
    assert filled["staleness"]["snapshot_at"] is not None


async def test_events_apply_once_and_an_older_one_changes_nothing(rabbit_vhost: str) -> None:
    registry = InMemoryRegistry()
    async with AsyncExitStack() as stack:
        order = await start_order(stack, rabbit_vhost, registry)
        await wait_ready(order)
        connection = await aio_pika.connect(rabbit_vhost)
        stack.push_async_callback(connection.close)
        channel = await connection.channel(on_return_raises=True)
        exchange = await declare_events_exchange(channel, Topology())
        v5 = product_event("ZZ-1", version=5, price="10.00", sequence=5)
        await publish_when_bound(exchange, v5)
        fifth = await catalogue_entry(order, "ZZ-1", lambda p: p["version"] == 5)
        await exchange.publish(encode(v5), "inventory.product_changed")  # the same, again
        await exchange.publish(
            encode(product_event("ZZ-1", version=3, price="7.00", sequence=3)),  # older, late
            "inventory.product_changed",
        )
        await exchange.publish(
            encode(product_event("ZZ-1", version=6, price="12.00", sequence=6)),
            "inventory.product_changed",
        )
        sixth = await catalogue_entry(order, "ZZ-1", lambda p: p["version"] == 6)
        consumed = await inbox_count(order)
    assert fifth["product"]["price"] == "10.00"
    assert sixth["product"]["price"] == "12.00"  # 7.00 (version 3) never showed
    assert consumed == 3  # v5 once (its copy was a duplicate), v3 (a no-op), v6


async def test_a_cold_replica_fills_while_events_flow_losing_and_doubling_none(
    rabbit_vhost: str,
) -> None:
    registry = InMemoryRegistry()
    async with AsyncExitStack() as stack:
        # Some queue is bound to everything, as order's timeline is in a running system: the
        # events published before this order instance exists are routable, not returned.
        await bystander_queue(stack, rabbit_vhost)
        inventory = await participant(stack, INVENTORY, InventorySettings, rabbit_vhost, registry)
        writer = Writer(inventory)
        writing = asyncio.create_task(writer.run(changes=60))
        await asyncio.sleep(0.5)  # changes committed before the replica exists
        order = await start_order(stack, rabbit_vhost, registry, catalogue_refresh=0.1)
        await writing
        truth = (await inventory.get("/catalogue/snapshot")).json()["products"]
        replica = await converged(order, truth)
    assert writer.changes == 60
    assert {p["sku"]: p["version"] for p in replica} == {p["sku"]: p["version"] for p in truth}
    assert [(p["price"], p["available"]) for p in replica] == [
        (p["price"], p["available"]) for p in truth
    ]


# -- helpers ---------------------------------------------------------------------------------


class Writer:
    """Changes inventory's products while a replica starts: prices of two SKUs in turn, and a
    reservation of a third now and then (its units available change)."""

    def __init__(self, inventory: httpx.AsyncClient) -> None:
        self.inventory = inventory
        self.changes = 0

    async def run(self, *, changes: int) -> None:
        for n in range(changes):
            if n % 5 == 4:
                await self._reserve()
            else:
                sku = KB if n % 2 else "MS-202"
                await self._price(sku, Decimal(100 + n))
            self.changes += 1
            await asyncio.sleep(0.03)

    async def _price(self, sku: str, price: Decimal) -> None:
        answer = await self.inventory.put(
            f"/products/{sku}/price", json={"price": str(price)}, headers={"X-Admin-Token": ADMIN}
        )
        assert answer.status_code == 200, answer.text

    async def _reserve(self) -> None:
        body = {"order_id": str(uuid.uuid4()), "items": [{"sku": "CB-404", "quantity": 1}]}
        answer = await self.inventory.post(
            "/reservations", json=body, headers={"Idempotency-Key": str(uuid.uuid4())}
        )
        assert answer.status_code == 201, answer.text


async def catalogue_entry(
    order: httpx.AsyncClient, sku: str, wanted: Any, within: float = WITHIN
) -> dict[str, Any]:
    """``GET /catalogue/{sku}`` once the replica is filled or the product satisfies ``wanted``
    (polled, at most ``within`` seconds)."""
    async with asyncio.timeout(within):
        while True:
            answer = await order.get(f"/catalogue/{sku}")
            if answer.status_code == 200 and wanted(answer.json()["product"]):
                body: dict[str, Any] = answer.json()
                return body
            await asyncio.sleep(0.05)


async def converged(order: httpx.AsyncClient, truth: list[dict[str, Any]]) -> list[Any]:
    """The replica's products once they all have inventory's versions."""
    versions = {p["sku"]: p["version"] for p in truth}
    async with asyncio.timeout(WITHIN):
        while True:
            body = (await order.get("/catalogue")).json()
            replica = body["products"]
            if {p["sku"]: p["version"] for p in replica} == versions:
                assert body["staleness"]["filled"]
                return list(replica)
            await asyncio.sleep(0.1)


def product_event(sku: str, *, version: int, price: str, sequence: int) -> OutgoingEvent:
    payload = {"sku": sku, "name": "Test", "price": price, "available": 1, "version": version}
    return OutgoingEvent(
        id=uuid.uuid4(),
        sequence=sequence,
        aggregate_type="product",
        aggregate_id=sku,
        event_type="product_changed",
        payload=payload,
        created_at=datetime.now(UTC),
    )


def encode(event: OutgoingEvent) -> aio_pika.Message:
    return encode_event(event, service="inventory")


async def publish_when_bound(exchange: Any, event: OutgoingEvent) -> None:
    """Publish once the catalogue's queue is bound: until then the broker returns it."""
    async with asyncio.timeout(10):
        while True:
            try:
                await exchange.publish(encode(event), "inventory.product_changed")
                return
            except aio_pika.exceptions.PublishError:
                await asyncio.sleep(0.05)


async def inbox_count(order: httpx.AsyncClient) -> int:
    async with context_of(order).db.pool.acquire() as conn:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM inbox WHERE consumer = $1", CATALOGUE_QUEUE
        )
    return count


async def bystander_queue(stack: AsyncExitStack, vhost: str) -> None:
    connection = await aio_pika.connect(vhost)
    stack.push_async_callback(connection.close)
    channel = await connection.channel()
    await declare_consumer_queue(channel, Topology(), "test.bystander", ["#"])


@asynccontextmanager
async def services(rabbit_vhost: str, **order_settings: Any) -> AsyncIterator[Stack]:
    """Inventory, payment and shipping on loopback, then order; ready, and registered."""
    registry = InMemoryRegistry()
    async with AsyncExitStack() as stack:
        inventory = await participant(stack, INVENTORY, InventorySettings, rabbit_vhost, registry)
        await participant(stack, PAYMENT, PaymentSettings, rabbit_vhost, registry)
        await participant(stack, SHIPPING, ShippingSettings, rabbit_vhost, registry)
        order = await start_order(stack, rabbit_vhost, registry, **order_settings)
        await wait_ready(order)
        yield Stack(order, inventory, registry)


async def start_order(
    stack: AsyncExitStack, vhost: str, registry: InMemoryRegistry, **settings: Any
) -> httpx.AsyncClient:
    dsn = await database_for_the_stack(stack, "om_cat_order")
    options = {**COMMON, "order_wait": 10.0, **settings}
    order_settings = OrderSettings(database_url=dsn, rabbitmq_url=vhost, **options)
    return await stack.enter_async_context(
        running(order_spec(order_settings), order_settings, registry, caller=None)
    )


async def participant(
    stack: AsyncExitStack,
    spec: ServiceSpec,
    settings_cls: type[ServiceSettings],
    vhost: str,
    registry: InMemoryRegistry,
) -> httpx.AsyncClient:
    """A participant serving HTTP on a loopback port, which it registers when ready."""
    dsn = await database_for_the_stack(stack, f"om_cat_{spec.name}")
    listening = stack.enter_context(loopback_socket())
    port = listening.getsockname()[1]
    settings = settings_cls(database_url=dsn, rabbitmq_url=vhost, port=port, **COMMON)
    client = await stack.enter_async_context(running(spec, settings, registry))
    await stack.enter_async_context(serving(client, listening))
    await wait_ready(client)
    return client
