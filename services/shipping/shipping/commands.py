"""Shipping's commands: load, decide (in the domain), save; each one idempotent by key.

>>> await run_command(db, key, fingerprint(request, body), CreateShipment(body))
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from ordermesh_shared.commands import Answer, Decision, Loaded, Recorded
from ordermesh_shared.database import DbConn
from ordermesh_shared.errors import NotFound

from shipping import store
from shipping.domain import Destination, Shipment
from shipping.models import Shipment as ShipmentAnswer
from shipping.models import ShipRequest

CreateState = tuple[Shipment | None, Destination]


def _answer(status: int, shipment: Shipment) -> Answer:
    return Answer(status, ShipmentAnswer.json_of(shipment))


def _changed(status: int, shipment: Shipment) -> Decision[Shipment]:
    """Answer with the new state, save it, and tell the others."""
    body = ShipmentAnswer.json_of(shipment)
    return Decision(Answer(status, body), shipment, shipment.event(body))


@dataclass(frozen=True)
class CreateShipment:
    """One shipment per order, only to supported destinations."""

    request: ShipRequest

    async def load(self, conn: DbConn, key: str) -> Loaded[CreateState]:
        request = self.request
        return await store.load_for_create(conn, key, request.order_id, request.destination)

    def decide(self, state: CreateState) -> Decision[Shipment]:
        existing, destination = state
        if existing is not None:  # made under another key: answered, or refused if cancelled
            existing.create_again()
            return Decision(_answer(200, existing))
        now = datetime.now(UTC)
        return _changed(201, Shipment.create(self.request.order_id, destination, now=now))

    async def save(self, conn: DbConn, change: Shipment, recorded: Recorded) -> None:
        await store.insert_shipment(conn, change, recorded)


@dataclass(frozen=True)
class CancelShipment:
    """Cancel an order's shipment (a compensation); first of all, leave a marker."""

    order_id: uuid.UUID

    async def load(self, conn: DbConn, key: str) -> Loaded[Shipment | None]:
        return await store.load_for_command(conn, key, self.order_id)

    def decide(self, state: Shipment | None) -> Decision[Shipment]:
        now = datetime.now(UTC)
        if state is None:  # the cancel came first: the marker refuses the late create
            marker = Shipment.cancelled_before_create(self.order_id, now=now)
            return Decision(_answer(200, marker), marker)
        cancelled = state.cancel(now=now)
        return _changed(200, cancelled) if cancelled else Decision(_answer(200, state))

    async def save(self, conn: DbConn, change: Shipment, recorded: Recorded) -> None:
        if change.is_marker:  # a new row, shipping nothing
            await store.insert_shipment(conn, change, recorded)
        else:
            await store.cancel_shipment(conn, change, recorded)


async def load_shipment(conn: DbConn, order_id: uuid.UUID) -> Shipment:
    """The shipment of an order; NotFound when it has none."""
    shipment = await store.shipment_of_order(conn, order_id)
    if shipment is None:
        raise NotFound(f"no shipment for order {order_id}")
    return shipment
