"""Inventory's command models and rules (no I/O)."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_QUANTITY = 1000
MAX_LINES = 50

ReservationStatus = Literal["reserved", "released", "committed"]


class Line(BaseModel):
    """One SKU and how many units."""

    model_config = ConfigDict(extra="forbid")

    sku: str = Field(min_length=1, max_length=64, examples=["KB-101"])
    quantity: int = Field(ge=1, le=MAX_QUANTITY, examples=[2])


class ReserveRequest(BaseModel):
    """Hold stock for an order."""

    model_config = ConfigDict(extra="forbid")

    order_id: uuid.UUID
    items: list[Line] = Field(min_length=1, max_length=MAX_LINES)

    @field_validator("items")
    @classmethod
    def _distinct_skus(cls, items: list[Line]) -> list[Line]:
        skus = [line.sku for line in items]
        if len(set(skus)) != len(skus):
            raise ValueError("each SKU may appear once; add the quantities together")
        return items


class ReservedLine(BaseModel):
    """A reserved line with the price it was reserved at."""

    sku: str
    quantity: int
    unit_price: Decimal


class Reservation(BaseModel):
    """The stock held for one order."""

    id: uuid.UUID
    order_id: uuid.UUID
    status: ReservationStatus
    items: list[ReservedLine]
    total: Decimal = Field(description="Sum of quantity x unit price.")


def total_of(items: list[ReservedLine]) -> Decimal:
    """What the reserved lines cost together."""
    return sum((line.unit_price * line.quantity for line in items), Decimal("0.00"))
