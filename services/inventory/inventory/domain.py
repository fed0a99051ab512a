"""Inventory's domain: stock held for orders, and the rules for taking and giving it back.

Plain Python, no I/O: each rule is a method that returns the new state (or None when nothing
changes) or raises ``Rejected`` / ``Conflict``; the commands load, decide here, and save.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Literal

from ordermesh_shared.commands import Event
from ordermesh_shared.errors import Conflict, Rejected

ReservationStatus = Literal["reserved", "released", "committed"]
# The event each status is entered with (a release before any reserve enters none).
EVENT_OF = {
    "reserved": "stock_reserved",
    "released": "stock_released",
    "committed": "stock_committed",
}


@dataclass(frozen=True, slots=True)
class Line:
    """One SKU and how many units an order wants."""

    sku: str
    quantity: int


@dataclass(frozen=True, slots=True)
class Stock:
    """What a reservation may take of one product: its price and the units available."""

    sku: str
    price: Decimal
    available: int


@dataclass(frozen=True, slots=True)
class ReservedLine:
    """A line held for an order, at the price it was reserved at."""

    sku: str
    quantity: int
    unit_price: Decimal


@dataclass(frozen=True, slots=True)
class Reservation:
    """The stock held for one order: reserved, then committed (sold) or released."""

    id: uuid.UUID
    order_id: uuid.UUID
    status: ReservationStatus
    lines: tuple[ReservedLine, ...] = ()

    @property
    def total(self) -> Decimal:
        """What the reserved lines cost together."""
        return sum((line.unit_price * line.quantity for line in self.lines), Decimal("0.00"))

    @classmethod
    def take(
        cls, order_id: uuid.UUID, wanted: Sequence[Line], stock: Mapping[str, Stock]
    ) -> Reservation:
        """Hold every line or none: an unknown SKU or a shortage refuses the whole order."""
        lines = []
        # SKU order (code points): the order lines are stored and answered in, every time.
        for line in sorted(wanted, key=lambda line: line.sku):
            product = stock.get(line.sku)
            if product is None:
                raise Rejected(f"unknown SKU {line.sku!r}", reason="unknown_sku")
            if product.available < line.quantity:
                raise Rejected(
                    f"insufficient stock for {line.sku}: {product.available} available,"
                    f" {line.quantity} requested",
                    reason="out_of_stock",
                )
            lines.append(ReservedLine(line.sku, line.quantity, product.price))
        return cls(uuid.uuid4(), order_id, "reserved", tuple(lines))

    @classmethod
    def released_before_reserve(cls, order_id: uuid.UUID) -> Reservation:
        """The marker a release leaves when it arrives before its reserve (the saga undid a
        reserve whose answer was lost): the late reserve is then refused, not leaked."""
        return cls(uuid.uuid4(), order_id, "released")

    def reserve_again(self) -> None:
        """A reserve for an order that holds a reservation already: fine (the caller gets it)
        unless the reservation was released, then the late reserve is refused."""
        if self.status == "released":
            raise Conflict(
                "the reservation for this order was already released; a late reserve is refused",
                reason="released",
            )

    def release(self) -> Reservation | None:
        """Give the units back; None when already released. Sold units are not released."""
        if self.status == "committed":
            raise Conflict("the reservation was already committed (sold)", reason="committed")
        return replace(self, status="released") if self.status == "reserved" else None

    def commit(self) -> Reservation | None:
        """Sell the held units; None when already committed. Released units cannot be sold."""
        if self.status == "released":
            raise Conflict(
                "the reservation was released; it cannot be committed", reason="released"
            )
        return replace(self, status="committed") if self.status == "reserved" else None

    def event(self, payload: Mapping[str, object]) -> Event:
        """The event this reservation's status was entered with."""
        return Event("reservation", str(self.order_id), EVENT_OF[self.status], payload)
