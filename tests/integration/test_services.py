"""Each service against a real Postgres and RabbitMQ: migrations, readiness, reads, 404s."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from inventory.app import SPEC as INVENTORY
from inventory.app import InventorySettings
from order.app import OrderSettings, order_spec
from ordermesh_shared.bootstrap import ServiceSpec
from payment.app import SPEC as PAYMENT
from payment.app import PaymentSettings
from shipping.app import SPEC as SHIPPING
from shipping.app import ShippingSettings

from tests.support.apps import running, wait_ready
from tests.support.fakes import InMemoryRegistry

pytestmark = pytest.mark.integration


async def test_inventory_migrates_seeds_and_serves_products(fresh_database: str) -> None:
    registry = InMemoryRegistry()
    settings = InventorySettings(database_url=fresh_database, port=18001)
    async with running(INVENTORY, settings, registry) as client:
        body = await wait_ready(client)
        assert body["status"] == "ok"
        assert {k: body["checks"][k] for k in ("database", "rabbitmq", "registry")} == {
            "database": "ok",
            "rabbitmq": "ok",
            "registry": "ok",
        }
        products = (await client.get("/products")).json()
        assert {p["sku"] for p in products} >= {"KB-101", "HP-505", "LS-606"}
        keyboard = (await client.get("/products/KB-101")).json()
        assert keyboard["price"] == "89.00"
        assert keyboard["available"] == 500
        missing = await client.get("/products/NOPE-1")
        assert missing.status_code == 404
        assert "NOPE-1" in missing.json()["detail"]


async def test_instance_registers_when_ready_and_leaves_on_shutdown(fresh_database: str) -> None:
    registry = InMemoryRegistry()
    settings = PaymentSettings(database_url=fresh_database, port=18002)
    async with running(PAYMENT, settings, registry) as client:
        await wait_ready(client)
        async with asyncio.timeout(5):
            while not registry.instances("payment"):
                await asyncio.sleep(0.05)
        (instance,) = registry.instances("payment")
        assert instance.port == 18002
        assert instance.instance_id == "payment-127.0.0.1-18002"
    assert registry.instances("payment") == ()


async def test_unready_instance_is_withdrawn_and_returns(fresh_database: str) -> None:
    registry = InMemoryRegistry()
    settings = ShippingSettings(database_url=fresh_database, port=18003)
    async with running(SHIPPING, settings, registry) as client:
        await wait_ready(client)
        async with asyncio.timeout(5):
            while not registry.instances("shipping"):
                await asyncio.sleep(0.05)
        registry.reachable = False
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["registry"].startswith("RegistryError")
        registry.reachable = True
        await wait_ready(client)
        assert len(registry.instances("shipping")) == 1


async def test_payment_and_shipping_reads(fresh_database: str) -> None:
    registry = InMemoryRegistry()
    settings = PaymentSettings(database_url=fresh_database, port=18002)
    async with running(PAYMENT, settings, registry) as client:
        await wait_ready(client)
        dave = (await client.get("/customers/dave")).json()
        assert dave == {"id": "dave", "name": "Dave Smith", "balance": "20.00"}
        assert (await client.get("/customers/zoe")).status_code == 404


async def test_shipping_destinations_and_unknown_shipment(fresh_database: str) -> None:
    settings = ShippingSettings(database_url=fresh_database, port=18003)
    async with running(SHIPPING, settings, InMemoryRegistry()) as client:
        await wait_ready(client)
        destinations = {
            d["code"]: d["supported"] for d in (await client.get("/destinations")).json()
        }
        assert destinations["DE"] is True
        assert destinations["AQ"] is False
        unknown = await client.get("/shipments/00000000-0000-0000-0000-000000000000")
        assert unknown.status_code == 404
        assert (await client.get("/shipments/not-a-uuid")).status_code == 422


async def test_order_unknown_id_and_route_are_json_404(fresh_database: str) -> None:
    settings = OrderSettings(database_url=fresh_database, port=18000)
    async with running(order_spec(settings), settings, InMemoryRegistry()) as client:
        await wait_ready(client)
        unknown = await client.get("/orders/00000000-0000-0000-0000-000000000000")
        assert unknown.status_code == 404
        assert unknown.headers["content-type"] == "application/json"
        route = await client.get("/no/such/route")
        assert route.status_code == 404
        assert route.json() == {"detail": "Not Found"}


async def test_unreachable_database_reports_not_ready_then_recovers() -> None:
    # Port 1 refuses at once: the service must start, say why it is not ready, and not crash.
    settings = InventorySettings(database_url="postgresql://postgres@127.0.0.1:1/x", port=18001)
    async with running(INVENTORY, settings, InMemoryRegistry()) as client:
        response = await client.get("/health/ready")
        assert response.status_code == 503
        assert response.json()["checks"]["database"] != "ok"
        products = await client.get("/products")
        assert products.status_code == 503
        assert "database" in products.json()["detail"]
        assert (await client.get("/health/live")).status_code == 200


async def test_metrics_count_requests_by_route(fresh_database: str) -> None:
    settings = InventorySettings(database_url=fresh_database, port=18001)
    async with running(INVENTORY, settings, InMemoryRegistry()) as client:
        await wait_ready(client)
        await client.get("/products/KB-101")
        text = (await client.get("/metrics")).text
        assert 'http_requests_total{method="GET",route="/products/{sku}",status="200"} 1.0' in text


async def test_a_broken_migration_is_named_by_readiness(
    fresh_database: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_broken.sql").write_text("CREATE TABLE oops (id int PRIMARY KEY")
    spec = ServiceSpec(name="inventory", title="broken", migrations=tmp_path)
    settings = InventorySettings(database_url=fresh_database, port=18001)
    async with running(spec, settings, InMemoryRegistry()) as client:
        async with asyncio.timeout(10):
            while (
                "failed"
                not in (body := (await client.get("/health/ready")).json())["checks"]["database"]
            ):
                await asyncio.sleep(0.05)
        assert body["checks"]["database"].startswith(
            "DatabaseNotReady: migrations failed: PostgresSyntaxError"
        )
