"""Create and cancel shipments: each runs inside the idempotent command's transaction."""

from __future__ import annotations

import uuid

from ordermesh_shared.database import DbConn
from ordermesh_shared.errors import Conflict, NotFound, Rejected
from ordermesh_shared.outbox import add_event

from shipping import store
from shipping.domain import Shipment, ShipRequest


async def create_shipment(conn: DbConn, request: ShipRequest) -> tuple[int, Shipment]:
    """One shipment per order, only to supported destinations."""
    existing = await store.lock_shipment(conn, request.order_id)
    if existing is not None:
        if existing["status"] == "cancelled":
            raise Conflict(
                "the shipment for this order was already cancelled; a late create is refused",
                reason="cancelled",
            )
        return 200, Shipment(**dict(existing))
    if not await store.is_supported(conn, request.destination):
        raise Rejected(
            f"we do not ship to {request.destination}; GET /destinations lists where we do",
            reason="unsupported_destination",
        )
    row = await store.insert_shipment(conn, request.order_id, request.destination, "created")
    return 201, await _with_event(conn, Shipment(**dict(row)), "shipment_created")


async def _with_event(conn: DbConn, shipment: Shipment, event_type: str) -> Shipment:
    await add_event(
        conn,
        aggregate_type="shipment",
        aggregate_id=str(shipment.order_id),
        event_type=event_type,
        payload=shipment.model_dump(mode="json"),
    )
    return shipment


async def cancel_shipment(conn: DbConn, order_id: uuid.UUID) -> tuple[int, Shipment]:
    """Cancel the order's shipment; a cancel before any create leaves a 'cancelled' marker."""
    existing = await store.lock_shipment(conn, order_id)
    if existing is None:
        await store.insert_shipment(conn, order_id, None, "cancelled")
    elif existing["status"] == "created":
        cancelled = Shipment(**dict(await store.cancel(conn, order_id)))
        return 200, await _with_event(conn, cancelled, "shipment_cancelled")
    return 200, await load_shipment(conn, order_id)


async def load_shipment(conn: DbConn, order_id: uuid.UUID) -> Shipment:
    """The shipment of an order as the API shows it."""
    row = await store.shipment_of_order(conn, order_id)
    if row is None:
        raise NotFound(f"no shipment for order {order_id}")
    return Shipment(**dict(row))
