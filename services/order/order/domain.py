"""Orders: the request people send, the saga's input, and the statuses an order goes through."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

OrderStatus = Literal["pending", "completed", "cancelled", "compensation_failed"]
TERMINAL_STATUSES = ("completed", "cancelled", "compensation_failed")
MAX_QUANTITY = 1000
MAX_LINES = 50


class OrderLine(BaseModel):
    """One product and how many units."""

    model_config = ConfigDict(extra="forbid")

    sku: str = Field(min_length=1, max_length=64, examples=["KB-101"])
    quantity: int = Field(ge=1, le=MAX_QUANTITY, examples=[2])


class PlaceOrderRequest(BaseModel):
    """What a customer orders and where it goes."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "customer_id": "alice",
                    "items": [{"sku": "KB-101", "quantity": 1}, {"sku": "MS-202", "quantity": 2}],
                    "destination": "DE",
                }
            ]
        },
    )

    customer_id: str = Field(min_length=1, max_length=64, examples=["alice"])
    items: list[OrderLine] = Field(min_length=1, max_length=MAX_LINES)
    destination: str = Field(
        pattern=r"^[A-Z]{2}$",
        examples=["DE"],
        description="ISO 3166-1 alpha-2 country code; shipping's GET /destinations lists them.",
    )

    @field_validator("items")
    @classmethod
    def _distinct_skus(cls, items: list[OrderLine]) -> list[OrderLine]:
        skus = [line.sku for line in items]
        if len(set(skus)) != len(skus):
            raise ValueError("each SKU may appear once; add the quantities together")
        return items


@dataclass(frozen=True, slots=True)
class PlaceOrder:
    """The place-order saga's one input."""

    order_id: uuid.UUID
    customer_id: str
    items: tuple[tuple[str, int], ...]  # (sku, quantity)
    destination: str

    @classmethod
    def from_request(cls, order_id: uuid.UUID, request: PlaceOrderRequest) -> PlaceOrder:
        """The saga input for a validated request."""
        items = tuple((line.sku, line.quantity) for line in request.items)
        return cls(order_id, request.customer_id, items, request.destination)

    def to_json(self) -> dict[str, Any]:
        """JSON form stored in the saga row."""
        return {
            "order_id": str(self.order_id),
            "customer_id": self.customer_id,
            "items": [list(item) for item in self.items],
            "destination": self.destination,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlaceOrder:
        """Back from :meth:`to_json`."""
        return cls(
            uuid.UUID(data["order_id"]),
            data["customer_id"],
            tuple((sku, int(qty)) for sku, qty in data["items"]),
            data["destination"],
        )
