"""Every route of a service exists when its app is made, before any start-up: the OpenAPI
document a tool reads from an app that has not started is the whole API."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi import FastAPI
from inventory.app import InventorySettings
from inventory.app import create_app as inventory_app
from order.app import OrderSettings
from order.app import create_app as order_app
from payment.app import PaymentSettings
from payment.app import create_app as payment_app
from shipping.app import ShippingSettings
from shipping.app import create_app as shipping_app

MAKERS: dict[str, Callable[[], FastAPI]] = {
    "order": lambda: order_app(OrderSettings()),
    "inventory": lambda: inventory_app(InventorySettings()),
    "payment": lambda: payment_app(PaymentSettings()),
    "shipping": lambda: shipping_app(ShippingSettings()),
}
EVERY_SERVICE = {
    "/health/live": {"get"},
    "/health/ready": {"get"},
    "/admin/outbox/quarantined": {"get"},
    "/admin/outbox/quarantined/redrive": {"post"},
    "/admin/outbox/fence": {"get"},
    "/admin/outbox/fence/rebase": {"post"},
}


@pytest.mark.parametrize("service", sorted(MAKERS))
def test_shared_routes_are_there_before_start_up(service: str) -> None:
    paths = MAKERS[service]().openapi()["paths"]
    for path, methods in EVERY_SERVICE.items():
        assert methods <= set(paths.get(path, {})), f"{service} lacks {path} before start-up"
