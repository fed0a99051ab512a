"""The shipping service's composition root."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from fastapi import FastAPI
from ordermesh_shared.bootstrap import ServiceSpec, create_service_app
from ordermesh_shared.config import ServiceSettings

from shipping.api import router

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


class ShippingSettings(ServiceSettings):
    """Shipping settings: the shared ones, with shipping's defaults."""

    service_name: ClassVar[str] = "shipping"
    default_port: ClassVar[int] = 8003


SPEC = ServiceSpec(
    name="shipping",
    title="Ordermesh shipping",
    description="Shipments to supported destinations.",
    migrations=MIGRATIONS,
    routers=[router],
)


def create_app(settings: ShippingSettings) -> FastAPI:
    """Build the shipping app (nothing opens until its lifespan starts)."""
    return create_service_app(SPEC, settings)
