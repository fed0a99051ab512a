"""Shipping's HTTP models: what requests carry and answers show (pydantic, at the edge)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shipping import domain
from shipping.domain import ShipmentStatus


class ShipRequest(BaseModel):
    """Create the shipment of an order."""

    model_config = ConfigDict(extra="forbid")

    order_id: uuid.UUID
    destination: str = Field(
        pattern=r"^[A-Z]{2}$", examples=["DE"], description="ISO 3166-1 alpha-2 country code."
    )


class Shipment(BaseModel):
    """The shipment of one order (destination is empty on a cancel that came first)."""

    id: uuid.UUID
    order_id: uuid.UUID
    destination: str | None = Field(examples=["DE"])
    status: ShipmentStatus
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, shipment: domain.Shipment) -> Shipment:
        """The answer for a shipment."""
        return cls(
            id=shipment.id,
            order_id=shipment.order_id,
            destination=shipment.destination,
            status=shipment.status,
            created_at=shipment.created_at,
            updated_at=shipment.updated_at,
        )

    @classmethod
    def json_of(cls, shipment: domain.Shipment) -> dict[str, Any]:
        """The answer's JSON body (as stored with the command's key)."""
        return cls.of(shipment).model_dump(mode="json")
