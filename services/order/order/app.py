"""The order service's composition root."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from fastapi import FastAPI
from ordermesh_shared.bootstrap import ServiceSpec, create_service_app
from ordermesh_shared.config import ServiceSettings

from order.api import router

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


class OrderSettings(ServiceSettings):
    """Order settings: the shared ones, with order's defaults."""

    service_name: ClassVar[str] = "order"
    default_port: ClassVar[int] = 8000


SPEC = ServiceSpec(
    name="order",
    title="Ordermesh order",
    description="The public order API: place orders and follow them through the saga.",
    migrations=MIGRATIONS,
    routers=[router],
)


def create_app(settings: OrderSettings) -> FastAPI:
    """Build the order app (nothing opens until its lifespan starts)."""
    return create_service_app(SPEC, settings)
