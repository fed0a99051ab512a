"""Reserve, release and commit stock: each runs inside the idempotent command's transaction."""

from __future__ import annotations

import uuid
from typing import NoReturn

from asyncpg import Record
from ordermesh_shared.database import DbConn
from ordermesh_shared.errors import Conflict, NotFound, Rejected
from ordermesh_shared.outbox import add_event

from inventory import store
from inventory.domain import Reservation, ReservedLine, ReserveRequest, total_of


async def reserve_stock(conn: DbConn, request: ReserveRequest) -> tuple[int, Reservation]:
    """Hold every line or none (a shortage raises, and the rollback undoes the lines held)."""
    reservation_id = uuid.uuid4()
    # Insert first, look second: the common case (a new order) costs one round trip.
    if not await store.open_reservation(conn, reservation_id, request.order_id):
        return 200, await _refuse_if_released(conn, await _locked(conn, request.order_id))
    lines = []
    # SKU order: two orders racing for the same SKUs lock rows in one order (no deadlock).
    for line in sorted(request.items, key=lambda item: item.sku):
        price = await store.reserve_line(conn, reservation_id, line.sku, line.quantity)
        if price is None:
            await _explain_shortage(conn, line.sku, line.quantity)
        lines.append(ReservedLine(sku=line.sku, quantity=line.quantity, unit_price=price))
    reservation = _reservation(reservation_id, request.order_id, "reserved", lines)
    await _event(conn, reservation, "stock_reserved")
    return 201, reservation


async def _locked(conn: DbConn, order_id: uuid.UUID) -> Record:
    """The reservation an insert just conflicted with (committed, so this statement sees it)."""
    existing = await store.lock_reservation(conn, order_id)
    if existing is None:  # reservations are never deleted
        raise RuntimeError(f"the reservation of order {order_id} vanished")
    return existing


def _reservation(
    reservation_id: uuid.UUID, order_id: uuid.UUID, status: str, lines: list[ReservedLine]
) -> Reservation:
    # Built from what this transaction wrote: no need to read it back.
    return Reservation(
        id=reservation_id, order_id=order_id, status=status, items=lines, total=total_of(lines)
    )


async def _event(conn: DbConn, reservation: Reservation, event_type: str) -> None:
    await add_event(
        conn,
        aggregate_type="reservation",
        aggregate_id=str(reservation.order_id),
        event_type=event_type,
        payload=reservation.model_dump(mode="json"),
    )


async def _refuse_if_released(conn: DbConn, existing: Record) -> Reservation:
    if existing["status"] == "released":
        raise Conflict(
            "the reservation for this order was already released; a late reserve is refused",
            reason="released",
        )
    return await load_reservation(conn, existing["order_id"])


async def _explain_shortage(conn: DbConn, sku: str, quantity: int) -> NoReturn:
    product = await store.get_product(conn, sku)
    if product is None:
        raise Rejected(f"unknown SKU {sku!r}", reason="unknown_sku")
    raise Rejected(
        f"insufficient stock for {sku}: {product['available']} available, {quantity} requested",
        reason="out_of_stock",
    )


async def release_stock(conn: DbConn, order_id: uuid.UUID) -> tuple[int, Reservation]:
    """Give held units back; a release before any reserve leaves a 'released' marker."""
    # Insert first, as reserve_stock does: racing a reserve, one of the two inserts wins.
    marker_id = uuid.uuid4()
    if await store.open_reservation(conn, marker_id, order_id, "released"):
        return 200, _reservation(marker_id, order_id, "released", [])
    existing = await _locked(conn, order_id)
    if existing["status"] == "committed":
        raise Conflict("the reservation was already committed (sold)", reason="committed")
    if existing["status"] == "reserved":
        lines = await _lines(conn, existing["id"])
        for line in lines:
            await store.return_stock(conn, line.sku, line.quantity)
        await store.set_status(conn, existing["id"], "released")
        released = _reservation(existing["id"], order_id, "released", lines)
        await _event(conn, released, "stock_released")
        return 200, released
    return 200, await load_reservation(conn, order_id)


async def commit_stock(conn: DbConn, order_id: uuid.UUID) -> tuple[int, Reservation]:
    """Turn held units into sold units."""
    existing = await store.lock_reservation(conn, order_id)
    if existing is None:
        raise NotFound(f"no reservation for order {order_id}")
    if existing["status"] == "released":
        raise Conflict("the reservation was released; it cannot be committed", reason="released")
    if existing["status"] == "reserved":
        lines = await _lines(conn, existing["id"])
        for line in lines:
            await store.sell_stock(conn, line.sku, line.quantity)
        await store.set_status(conn, existing["id"], "committed")
        committed = _reservation(existing["id"], order_id, "committed", lines)
        await _event(conn, committed, "stock_committed")
        return 200, committed
    return 200, await load_reservation(conn, order_id)


async def _lines(conn: DbConn, reservation_id: uuid.UUID) -> list[ReservedLine]:
    return [ReservedLine(**dict(r)) for r in await store.reservation_items(conn, reservation_id)]


async def load_reservation(conn: DbConn, order_id: uuid.UUID) -> Reservation:
    """The reservation of an order as the API shows it."""
    row = await store.get_reservation(conn, order_id)
    if row is None:
        raise NotFound(f"no reservation for order {order_id}")
    return _reservation(row["id"], order_id, row["status"], await _lines(conn, row["id"]))
