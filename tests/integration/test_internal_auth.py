"""Internal endpoints answer only the platform's services: service tokens, caller-namespaced
idempotency keys, private balances, admin endpoints without a default token."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from inventory.app import SPEC as INVENTORY
from inventory.app import InventorySettings
from ordermesh_shared.config import ServiceSettings
from payment.app import SPEC as PAYMENT
from payment.app import PaymentSettings
from pydantic import SecretStr
from shipping.app import SPEC as SHIPPING
from shipping.app import ShippingSettings

from tests.support.apps import anonymous, bearer, running, wait_ready

pytestmark = pytest.mark.integration

SPECS = {"inventory": INVENTORY, "payment": PAYMENT, "shipping": SHIPPING}
SETTINGS: dict[str, type[ServiceSettings]] = {
    "inventory": InventorySettings,
    "payment": PaymentSettings,
    "shipping": ShippingSettings,
}
ORDER_ID = str(uuid.uuid4())
# Every state-changing endpoint of every participant: (service, path, body).
COMMANDS = [
    (
        "inventory",
        "/reservations",
        {"order_id": ORDER_ID, "items": [{"sku": "KB-101", "quantity": 1}]},
    ),
    ("inventory", f"/reservations/{ORDER_ID}/release", None),
    ("inventory", f"/reservations/{ORDER_ID}/commit", None),
    ("payment", "/payments", {"order_id": ORDER_ID, "customer_id": "alice", "amount": "1.00"}),
    ("payment", f"/payments/{ORDER_ID}/refund", None),
    ("shipping", "/shipments", {"order_id": ORDER_ID, "destination": "DE"}),
    ("shipping", f"/shipments/by-order/{ORDER_ID}/cancel", None),
]
KEY = {"Idempotency-Key": f"{ORDER_ID}:step"}


@pytest.fixture
async def service(
    request: pytest.FixtureRequest, fresh_database: str
) -> AsyncIterator[tuple[httpx.AsyncClient, ServiceSettings]]:
    name: str = request.param
    settings = SETTINGS[name](database_url=fresh_database, admin_token=SecretStr("a" * 20))
    async with running(SPECS[name], settings, caller=None) as client:
        await wait_ready(client)
        yield client, settings


def _commands_of(name: str) -> list[tuple[str, dict[str, Any] | None]]:
    return [(path, body) for service, path, body in COMMANDS if service == name]


async def _state_unchanged(client: httpx.AsyncClient, name: str) -> None:
    # Nothing an unauthenticated call sent was applied.
    authenticated = bearer_for(client, name)
    paths = {
        "inventory": f"/reservations/{ORDER_ID}",
        "payment": f"/payments/{ORDER_ID}",
        "shipping": f"/shipments?order_id={ORDER_ID}",
    }
    assert (await client.get(paths[name], headers=authenticated)).status_code == 404


def bearer_for(client: httpx.AsyncClient, name: str, **kwargs: Any) -> dict[str, str]:
    settings: ServiceSettings = client.app_context.settings  # type: ignore[attr-defined]
    return bearer(settings.service_token_secret, audience=name, **kwargs)


@pytest.mark.parametrize("service", list(SPECS), indirect=True)
async def test_every_command_refuses_callers_without_a_valid_service_token(
    service: tuple[httpx.AsyncClient, ServiceSettings],
) -> None:
    client, settings = service
    name = settings.service_name
    other = "payment" if name != "payment" else "inventory"
    secret, forged = settings.service_token_secret, SecretStr("f" * 32)
    for path, body in _commands_of(name):
        anon = await client.post(path, json=body, headers=KEY)
        assert anon.status_code == 401, (path, anon.text)
        assert "service token" in anon.json()["detail"]
        assert anon.headers["WWW-Authenticate"] == "Bearer"
        refused = {
            "another audience": bearer(secret, audience=other),
            "expired": bearer(secret, audience=name, ttl=-120),
            "wrong secret": bearer(forged, audience=name),
            "not a token": {"Authorization": "Bearer not-a-jwt"},
        }
        for why, auth in refused.items():
            answer = await client.post(path, json=body, headers=KEY | auth)
            assert answer.status_code == 403, (path, why, answer.text)
            assert answer.json()["detail"].startswith("internal endpoint:"), why
        await _state_unchanged(client, name)


@pytest.mark.parametrize("service", ["inventory"], indirect=True)
async def test_the_catalogue_stays_open(service: tuple[httpx.AsyncClient, ServiceSettings]) -> None:
    client, _ = service
    assert (await client.get("/products")).status_code == 200
    assert (await client.get("/products/KB-101")).status_code == 200


@pytest.mark.parametrize("service", ["payment"], indirect=True)
async def test_balances_are_shown_only_to_services_and_admins(
    service: tuple[httpx.AsyncClient, ServiceSettings],
) -> None:
    client, _ = service
    listed = (await client.get("/customers")).json()
    assert {"id": "alice", "name": "Alice Martin"} in listed
    assert all("balance" not in customer for customer in listed)
    assert "balance" not in (await client.get("/customers/alice")).json()
    wrong = await client.get("/customers", headers={"X-Admin-Token": "guess"})
    assert all("balance" not in customer for customer in wrong.json())
    for auth in (bearer_for(client, "payment"), {"X-Admin-Token": "a" * 20}):
        shown = (await client.get("/customers", headers=auth)).json()
        assert all("balance" in customer for customer in shown)
        assert (await client.get("/customers/bob", headers=auth)).json()["balance"] == "50000.00"


@pytest.mark.parametrize("service", ["payment"], indirect=True)
async def test_a_caller_cannot_occupy_or_read_the_key_of_another(
    service: tuple[httpx.AsyncClient, ServiceSettings],
) -> None:
    client, _ = service
    order, intruder = (
        bearer_for(client, "payment"),
        bearer_for(client, "payment", caller="shipping"),
    )
    order_id = str(uuid.uuid4())
    charge = {"order_id": order_id, "customer_id": "carol", "amount": "120.00"}
    charged = await client.post(
        "/payments", json=charge, headers=order | {"Idempotency-Key": f"{order_id}:charge"}
    )
    assert charged.status_code == 201
    # Another service takes the key order's compensation will use, for something else...
    undo = {"Idempotency-Key": f"{order_id}:charge:undo"}
    taken = await client.post(f"/payments/{uuid.uuid4()}/refund", headers=intruder | undo)
    assert taken.status_code == 200
    # ...and order's refund still runs under it, as its own first call.
    refund = await client.post(f"/payments/{order_id}/refund", headers=order | undo)
    assert (refund.status_code, refund.json()["status"]) == (200, "refunded")
    assert refund.headers["Idempotent-Replay"] == "false"
    # Replaying order's key does not hand another caller order's stored answer.
    replay = await client.post(
        "/payments", json=charge, headers=intruder | {"Idempotency-Key": f"{order_id}:charge"}
    )
    assert replay.headers["Idempotent-Replay"] == "false"
    assert replay.status_code == 409  # its own answer: the payment was refunded meanwhile


async def test_without_an_admin_token_the_admin_endpoints_are_disabled(
    fresh_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ADMIN_TOKEN", raising=False)
    settings = PaymentSettings(database_url=fresh_database)
    async with running(PAYMENT, settings) as client:
        for token in ({}, {"X-Admin-Token": ""}, {"X-Admin-Token": "ordermesh-admin"}):
            answer = await client.put("/admin/faults", json={"status": 503}, headers=token)
            assert answer.status_code == 403
            assert "ADMIN_TOKEN is not set" in answer.json()["detail"]


async def test_the_openapi_documents_who_may_call(fresh_database: str) -> None:
    settings = InventorySettings(database_url=fresh_database)
    async with running(INVENTORY, settings) as client, anonymous(client) as plain:
        schema = (await plain.get("/openapi.json")).json()
    scheme = schema["components"]["securitySchemes"]["ServiceToken"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    reserve = schema["paths"]["/reservations"]["post"]
    assert reserve["security"] == [{"ServiceToken": []}]
    assert {"401", "403"} <= set(reserve["responses"])
    assert "security" not in schema["paths"]["/products"]["get"]
