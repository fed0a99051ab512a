"""Shipping's domain: one shipment per order, to supported destinations, and its cancel.

Plain Python, no I/O: each rule is a method that returns the new state (or None when nothing
changes) or raises ``Rejected`` / ``Conflict``; the commands load, decide here, and save.
The clock is the caller's (``now``), so a decision's timestamps are the ones stored.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from ordermesh_shared.commands import Event
from ordermesh_shared.errors import Conflict, Rejected

ShipmentStatus = Literal["created", "cancelled"]
# The event each status is entered with (a cancel before any create enters none).
EVENT_OF = {"created": "shipment_created", "cancelled": "shipment_cancelled"}


@dataclass(frozen=True, slots=True)
class Destination:
    """A country code and whether we ship there (an unknown code is not supported)."""

    code: str
    supported: bool


@dataclass(frozen=True, slots=True)
class Shipment:
    """The shipment of one order: created, then maybe cancelled (a compensation)."""

    id: uuid.UUID
    order_id: uuid.UUID
    destination: str | None  # None on the marker of a cancel that came first
    status: ShipmentStatus
    created_at: datetime
    updated_at: datetime

    @property
    def is_marker(self) -> bool:
        """True for the row a cancel leaves when it arrives before any create."""
        return self.destination is None

    @classmethod
    def create(cls, order_id: uuid.UUID, destination: Destination, *, now: datetime) -> Shipment:
        """A new shipment, only to a destination we ship to."""
        if not destination.supported:
            raise Rejected(
                f"we do not ship to {destination.code}; GET /destinations lists where we do",
                reason="unsupported_destination",
            )
        return cls(uuid.uuid4(), order_id, destination.code, "created", now, now)

    @classmethod
    def cancelled_before_create(cls, order_id: uuid.UUID, *, now: datetime) -> Shipment:
        """The marker a cancel leaves when it arrives before its create (the saga undid a
        create whose answer was lost): the late create is then refused, not shipped."""
        return cls(uuid.uuid4(), order_id, None, "cancelled", now, now)

    def create_again(self) -> None:
        """A create for an order that has a shipment already: fine (the caller gets it)
        unless the shipment was cancelled, then the late create is refused."""
        if self.status == "cancelled":
            raise Conflict(
                "the shipment for this order was already cancelled; a late create is refused",
                reason="cancelled",
            )

    def cancel(self, *, now: datetime) -> Shipment | None:
        """The shipment cancelled; None when it is cancelled already."""
        if self.status == "cancelled":
            return None
        return replace(self, status="cancelled", updated_at=now)

    def event(self, payload: Mapping[str, object]) -> Event:
        """The event this shipment's status was entered with."""
        return Event("shipment", str(self.order_id), EVENT_OF[self.status], payload)
