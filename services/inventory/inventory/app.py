"""The inventory service's composition root."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from fastapi import FastAPI
from ordermesh_shared.bootstrap import ServiceSpec, create_service_app
from ordermesh_shared.config import ServiceSettings

from inventory.api import router

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


class InventorySettings(ServiceSettings):
    """Inventory settings: the shared ones, with inventory's defaults."""

    service_name: ClassVar[str] = "inventory"
    default_port: ClassVar[int] = 8001


SPEC = ServiceSpec(
    name="inventory",
    title="Ordermesh inventory",
    description="Products with price and stock; reservations held for orders.",
    migrations=MIGRATIONS,
    routers=[router],
)


def create_app(settings: InventorySettings) -> FastAPI:
    """Build the inventory app (nothing opens until its lifespan starts)."""
    return create_service_app(SPEC, settings)
