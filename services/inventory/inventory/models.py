"""Inventory's HTTP models: what requests carry and answers show (pydantic, at the edge)."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inventory import domain
from inventory.domain import ReservationStatus

MAX_QUANTITY = 1000
MAX_LINES = 50


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

    def lines(self) -> tuple[domain.Line, ...]:
        """The lines, as the domain takes them."""
        return tuple(domain.Line(item.sku, item.quantity) for item in self.items)


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

    @classmethod
    def of(cls, reservation: domain.Reservation) -> Reservation:
        """The answer for a reservation."""
        items = [ReservedLine(sku=i.sku, quantity=i.quantity, unit_price=i.unit_price)
                 for i in reservation.lines]  # fmt: skip
        return cls(
            id=reservation.id,
            order_id=reservation.order_id,
            status=reservation.status,
            items=items,
            total=reservation.total,
        )

    @classmethod
    def json_of(cls, reservation: domain.Reservation) -> dict[str, Any]:
        """The answer's JSON body (as stored with the command's key)."""
        return cls.of(reservation).model_dump(mode="json")
