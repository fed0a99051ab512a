"""Orders: the request people send, the saga's input, the statuses an order goes through, and
the quote from the catalogue replica compared with what inventory took."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from ordermesh_shared.errors import Rejected
from ordermesh_shared.idempotency import KeyReused
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

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
class Line:
    """One product and how many units: the one shape an order line keeps from the request
    to inventory's reservation."""

    sku: str
    quantity: int


@dataclass(frozen=True, slots=True)
class PlaceOrder:
    """The place-order saga's one input."""

    order_id: uuid.UUID
    customer_id: str
    lines: tuple[Line, ...]
    destination: str

    @classmethod
    def from_request(cls, order_id: uuid.UUID, request: PlaceOrderRequest) -> PlaceOrder:
        """The saga input for a validated request."""
        lines = tuple(Line(line.sku, line.quantity) for line in request.items)
        return cls(order_id, request.customer_id, lines, request.destination)

    def to_json(self) -> dict[str, Any]:
        """JSON form stored in the saga row."""
        stored: dict[str, Any] = _adapter(PlaceOrder).dump_python(self, mode="json")
        return stored

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlaceOrder:
        """Back from :meth:`to_json`."""
        order: PlaceOrder = _adapter(PlaceOrder).validate_python(data)
        return order


# What each step of the saga returns: typed, money as Decimal, kept across a handover.


@dataclass(frozen=True, slots=True)
class Reserved:
    """reserve_stock's result: what inventory took, at the prices it took it at."""

    total: Decimal
    prices: Mapping[str, Decimal]  # SKU -> unit price


@dataclass(frozen=True, slots=True)
class Charged:
    """charge_payment's result."""

    payment_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Shipped:
    """create_shipment's result."""

    shipment_id: uuid.UUID


# A saga's end states are the order's; while it runs, the order is pending.
_ENDED: dict[str, OrderStatus] = {
    "completed": "completed",
    "cancelled": "cancelled",
    "compensation_failed": "compensation_failed",
}


def order_status(saga_status: str) -> OrderStatus:
    """The order's status for its saga's: pending until the saga ends, then the same."""
    return _ENDED.get(saga_status, "pending")


def replayed(
    order_id: uuid.UUID, stored_fingerprint: str, fingerprint: str, key: str | None
) -> uuid.UUID:
    """The order an Idempotency-Key created, for a replay of the same request; a key reused
    with another request is refused (422)."""
    if stored_fingerprint != fingerprint:
        raise KeyReused(f"Idempotency-Key {key!r} was already used for a different order")
    return order_id


# -- quoting from the catalogue replica, and what inventory then took ------------------------


@dataclass(frozen=True, slots=True)
class ProductFact:
    """What the catalogue replica knows of a product: inventory's facts at one version."""

    sku: str
    name: str
    price: Decimal
    available: int  # a hint: inventory decides at reservation
    version: int  # inventory's; grows with every change of price or availability
    changed_at: datetime | None = None  # the event's time at inventory (None: a snapshot's)


@dataclass(frozen=True, slots=True)
class Quote:
    """The unit prices the replica quoted for an order's lines (SKU -> price); a line the
    replica does not know is missing, which only a cold replica allows."""

    prices: Mapping[str, Decimal]

    def price_of(self, sku: str) -> Decimal | None:
        """The quoted unit price of ``sku``, or None when it was not quoted."""
        return self.prices.get(sku)


def quote(lines: Sequence[Line], catalogue: Mapping[str, ProductFact], *, filled: bool) -> Quote:
    """The replica's prices for ``lines``. Once the replica has been filled from inventory an
    unknown SKU is refused (422); while it is cold, what it does not know yet is let through
    unquoted, and inventory's reservation decides."""
    unknown = sorted(line.sku for line in lines if line.sku not in catalogue)
    if unknown and filled:
        raise Rejected(
            f"unknown SKU(s): {', '.join(unknown)} (GET /catalogue lists the products)",
            reason="unknown_sku",
        )
    return Quote({line.sku: catalogue[line.sku].price for line in lines if line.sku in catalogue})


@dataclass(frozen=True, slots=True)
class PriceChange:
    """A line whose price at inventory's reservation differs from the quoted one."""

    sku: str
    quoted: Decimal
    taken: Decimal

    @property
    def difference(self) -> Decimal:
        """What the customer pays per unit over the quote (negative: less)."""
        return self.taken - self.quoted


def price_changes(
    quoted: Mapping[str, Decimal | None], taken: Mapping[str, Decimal | None]
) -> list[PriceChange]:
    """The lines, by SKU, that were quoted and then taken at another price. A line not quoted
    (cold replica) or not taken (nothing reserved) has nothing to compare."""
    changes = []
    for sku in sorted(quoted):
        was, now = quoted[sku], taken.get(sku)
        if was is not None and now is not None and was != now:
            changes.append(PriceChange(sku, was, now))
    return changes


@functools.cache
def _adapter(kind: type[PlaceOrder]) -> TypeAdapter[PlaceOrder]:
    return TypeAdapter(kind)  # built on first use, not at import
