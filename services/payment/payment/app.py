"""The payment service's composition root."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from fastapi import FastAPI
from ordermesh_shared.bootstrap import ServiceSpec, create_service_app
from ordermesh_shared.config import ServiceSettings

from payment.api import router

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


class PaymentSettings(ServiceSettings):
    """Payment settings: the shared ones, with payment's defaults."""

    service_name: ClassVar[str] = "payment"
    default_port: ClassVar[int] = 8002


SPEC = ServiceSpec(
    name="payment",
    title="Ordermesh payment",
    description="Customer accounts with balances; charges and refunds.",
    migrations=MIGRATIONS,
    routers=[router],
)


def create_app(settings: PaymentSettings) -> FastAPI:
    """Build the payment app (nothing opens until its lifespan starts)."""
    return create_service_app(SPEC, settings)
