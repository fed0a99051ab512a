"""Shipping's command models (no I/O)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
    status: Literal["created", "cancelled"]
    created_at: datetime
    updated_at: datetime
