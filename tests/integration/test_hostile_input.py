"""Hostile input against the real service apps: oversized bodies and headers, and text Postgres
cannot store (NUL, lone surrogates) in bodies, path and query parameters and headers."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from inventory.app import SPEC as INVENTORY
from inventory.app import InventorySettings
from order.app import OrderSettings, order_spec
from ordermesh_shared.bootstrap import ServiceSpec
from ordermesh_shared.config import ServiceSettings
from payment.app import SPEC as PAYMENT
from payment.app import PaymentSettings
from shipping.app import SPEC as SHIPPING
from shipping.app import ShippingSettings

from tests.support.apps import running, wait_ready
from tests.support.fakes import InMemoryRegistry

pytestmark = pytest.mark.integration

LIMIT = 65536  # MAX_BODY_BYTES' default


@dataclass(frozen=True)
class Service:
    settings: Callable[[str], ServiceSettings]
    spec: Callable[[ServiceSettings], ServiceSpec]
    post: str  # a POST route with a JSON body


def _order_spec(settings: ServiceSettings) -> ServiceSpec:
    assert isinstance(settings, OrderSettings)
    return order_spec(settings)


SERVICES = {
    "order": Service(lambda db: OrderSettings(database_url=db), _order_spec, "/orders"),
    "inventory": Service(
        lambda db: InventorySettings(database_url=db), lambda _s: INVENTORY, "/reservations"
    ),
    "payment": Service(
        lambda db: PaymentSettings(database_url=db), lambda _s: PAYMENT, "/payments"
    ),
    "shipping": Service(
        lambda db: ShippingSettings(database_url=db), lambda _s: SHIPPING, "/shipments"
    ),
}


async def _then_hang(*chunks: bytes) -> AsyncIterator[bytes]:
    """A request body that sends ``chunks`` and then never ends: reading on would hang."""
    for chunk in chunks:
        yield chunk
    await asyncio.Event().wait()


async def _post_json(
    client: httpx.AsyncClient, path: str, body: Any, *, key: str | None = None
) -> httpx.Response:
    """POST ``body`` as JSON with ASCII escapes (how a lone surrogate travels: ``\\ud800``)."""
    headers = {"Content-Type": "application/json"} | ({"Idempotency-Key": key} if key else {})
    return await client.post(path, content=json.dumps(body), headers=headers)


def _loc(response: httpx.Response) -> list[Any]:
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert "NUL" in error["msg"]
    loc: list[Any] = error["loc"]
    return loc


@pytest.mark.parametrize("name", list(SERVICES))
async def test_oversized_body_gets_413_before_it_is_read(name: str, fresh_database: str) -> None:
    service = SERVICES[name]
    settings = service.settings(fresh_database)
    headers = {"Content-Type": "application/json", "Idempotency-Key": "k-1"}
    async with running(service.spec(settings), settings, InMemoryRegistry()) as client:
        await wait_ready(client)
        async with asyncio.timeout(10):  # a service reading on would wait for ever
            declared = await client.post(
                service.post,
                content=_then_hang(b'{"customer_id": "'),
                headers={**headers, "Content-Length": str(30 * 1024 * 1024)},
            )
            streamed = await client.post(  # chunked: no Content-Length, 70 KiB then nothing
                service.post, content=_then_hang(*[b" " * 1024] * 70), headers=headers
            )
        for response in (declared, streamed):
            assert response.status_code == 413
            assert response.json() == {"detail": f"request body larger than {LIMIT} bytes"}
        # Just under the limit is read and judged on its content.
        near = await client.post(service.post, content=b" " * (LIMIT - 10), headers=headers)
        assert near.status_code == 422


async def test_order_refuses_unstorable_text_naming_the_field(fresh_database: str) -> None:
    settings = OrderSettings(database_url=fresh_database)
    line = {"sku": "KB-101", "quantity": 1}
    order = {"customer_id": "alice", "items": [line], "destination": "DE"}
    async with running(order_spec(settings), settings, InMemoryRegistry()) as client:
        await wait_ready(client)
        nul_customer = await _post_json(client, "/orders", {**order, "customer_id": "al\x00ice"})
        assert _loc(nul_customer) == ["body", "customer_id"]
        lone = await _post_json(client, "/orders", {**order, "destination": "\ud800"})
        assert _loc(lone) == ["body", "destination"]
        sku = await _post_json(client, "/orders", {**order, "items": [{**line, "sku": "K\x00B"}]})
        assert _loc(sku) == ["body", "items", 0, "sku"]
        assert _loc(await client.get("/orders", params={"customer_id": "al\x00ice"})) == [
            "query",
            "customer_id",
        ]
        assert _loc(await client.get("/orders/%00")) == ["path", "order_id"]
        listed = await client.get("/orders", params={"customer_id": "alice"})
        assert listed.status_code == 200
        assert listed.json()["orders"] == []  # nothing was stored by the refused requests


async def test_inventory_refuses_unstorable_text_naming_the_field(fresh_database: str) -> None:
    settings = InventorySettings(database_url=fresh_database)
    async with running(INVENTORY, settings, InMemoryRegistry()) as client:
        await wait_ready(client)
        body = {"order_id": str(uuid.uuid4()), "items": [{"sku": "KB\x00101", "quantity": 1}]}
        nul = await _post_json(client, "/reservations", body, key="k-1")
        assert _loc(nul) == ["body", "items", 0, "sku"]
        body["items"] = [{"sku": "KB-101\udc00", "quantity": 1}]
        lone = await _post_json(client, "/reservations", body, key="k-2")
        assert _loc(lone) == ["body", "items", 0, "sku"]
        assert _loc(await client.get("/products/KB%00-101")) == ["path", "sku"]
        assert _loc(await client.get("/products", params={"sku": "\x00"})) == ["query", "sku"]
        keyboard = (await client.get("/products/KB-101")).json()
        assert keyboard["reserved"] == 0


async def test_payment_refuses_unstorable_text_naming_the_field(fresh_database: str) -> None:
    settings = PaymentSettings(database_url=fresh_database)
    async with running(PAYMENT, settings, InMemoryRegistry()) as client:
        await wait_ready(client)
        charge = {"order_id": str(uuid.uuid4()), "customer_id": "al\x00ice", "amount": "1.00"}
        nul = await _post_json(client, "/payments", charge, key="k-1")
        assert _loc(nul) == ["body", "customer_id"]
        # Raw bytes of a lone surrogate (ED A0 80), not an escape: json.loads lets them through.
        raw = b'{"order_id": "%s", "customer_id": "al\xed\xa0\x80", "amount": "1.00"}' % (
            str(uuid.uuid4()).encode()
        )
        headers = {"Content-Type": "application/json", "Idempotency-Key": "k-2"}
        lone = await client.post("/payments", content=raw, headers=headers)
        assert _loc(lone) == ["body", "customer_id"]
        assert _loc(await client.get("/customers/al%00ice")) == ["path", "customer_id"]
        bad_query = await client.get("/customers", params={"customer_id": "a\x00"})
        assert _loc(bad_query) == ["query", "customer_id"]
        key = await client.post(
            "/payments",
            json={**charge, "customer_id": "alice"},
            headers={"Idempotency-Key": "k\x00-3"},
        )
        assert _loc(key) == ["header", "idempotency-key"]
        # Not UTF-8 and not JSON: refused as such, the bad bytes shown escaped (was a 500).
        headers = {"Content-Type": "text/plain", "Idempotency-Key": "k-5"}
        garbage = await client.post("/payments", content=b"\xff\xfe", headers=headers)
        assert garbage.status_code == 422
        assert garbage.json()["detail"][0]["input"] == "\\xff\\xfe"
        # A surrogate pair is a real character: judged on its merits (no such customer).
        pair = {**charge, "order_id": str(uuid.uuid4()), "customer_id": "al\U0001f600"}
        emoji = await _post_json(client, "/payments", pair, key="k-4")
        assert emoji.json()["reason"] == "unknown_customer"


async def test_headers_have_length_limits_naming_the_header(fresh_database: str) -> None:
    settings = PaymentSettings(database_url=fresh_database)
    async with running(PAYMENT, settings, InMemoryRegistry()) as client:
        await wait_ready(client)
        charge = {"order_id": str(uuid.uuid4()), "customer_id": "alice", "amount": "1.00"}
        long_key = await client.post(
            "/payments", json=charge, headers={"Idempotency-Key": "k" * 201}
        )
        assert long_key.status_code == 422
        assert long_key.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
        huge = await client.get("/customers/alice", headers={"X-Trace-Note": "x" * 9000})
        assert huge.status_code == 431
        assert "x-trace-note" in huge.json()["detail"]
