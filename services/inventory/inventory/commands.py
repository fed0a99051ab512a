"""Inventory's commands: load, decide (in the domain), save; each one idempotent by key.

>>> await run_command(db, key, fingerprint(request, body), ReserveStock(body))
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from ordermesh_shared.commands import Answer, Decision, Loaded, Recorded
from ordermesh_shared.database import DbConn
from ordermesh_shared.errors import NotFound

from inventory import store
from inventory.domain import Reservation, Stock
from inventory.models import Reservation as ReservationAnswer
from inventory.models import ReserveRequest

ReserveState = tuple[Reservation | None, dict[str, Stock]]


def _answer(status: int, reservation: Reservation) -> Answer:
    return Answer(status, ReservationAnswer.json_of(reservation))


def _changed(reservation: Reservation) -> Decision[Reservation]:
    """Answer with the new state, save it, and tell the others."""
    body = ReservationAnswer.json_of(reservation)
    return Decision(Answer(200, body), reservation, reservation.event(body))


@dataclass(frozen=True)
class ReserveStock:
    """Hold every line of an order, or none."""

    request: ReserveRequest

    async def load(self, conn: DbConn, key: str) -> Loaded[ReserveState]:
        skus = [item.sku for item in self.request.items]
        return await store.load_for_reserve(conn, key, self.request.order_id, skus)

    def decide(self, state: ReserveState) -> Decision[Reservation]:
        existing, stock = state
        if existing is not None:  # made under another key: answered, or refused if released
            existing.reserve_again()
            return Decision(_answer(200, existing))
        taken = Reservation.take(self.request.order_id, self.request.lines(), stock)
        body = ReservationAnswer.json_of(taken)
        return Decision(Answer(201, body), taken, taken.event(body))

    async def save(self, conn: DbConn, change: Reservation, recorded: Recorded) -> None:
        await store.insert_reservation(conn, change, recorded)


@dataclass(frozen=True)
class ReleaseStock:
    """Give an order's units back (a compensation); first of all, leave a marker."""

    order_id: uuid.UUID

    async def load(self, conn: DbConn, key: str) -> Loaded[Reservation | None]:
        return await store.load_for_command(conn, key, self.order_id)

    def decide(self, state: Reservation | None) -> Decision[Reservation]:
        if state is None:  # the release came first: the marker refuses the late reserve
            marker = Reservation.released_before_reserve(self.order_id)
            return Decision(_answer(200, marker), marker)
        released = state.release()
        return _changed(released) if released else Decision(_answer(200, state))

    async def save(self, conn: DbConn, change: Reservation, recorded: Recorded) -> None:
        if change.lines:
            await store.settle_reservation(conn, change, recorded)
        else:  # the marker: a new row holding nothing
            await store.insert_reservation(conn, change, recorded)


@dataclass(frozen=True)
class CommitStock:
    """Turn an order's held units into sold units."""

    order_id: uuid.UUID

    async def load(self, conn: DbConn, key: str) -> Loaded[Reservation | None]:
        return await store.load_for_command(conn, key, self.order_id)

    def decide(self, state: Reservation | None) -> Decision[Reservation]:
        if state is None:
            raise NotFound(f"no reservation for order {self.order_id}")
        committed = state.commit()
        return _changed(committed) if committed else Decision(_answer(200, state))

    async def save(self, conn: DbConn, change: Reservation, recorded: Recorded) -> None:
        await store.settle_reservation(conn, change, recorded)


async def load_reservation(conn: DbConn, order_id: uuid.UUID) -> Reservation:
    """The reservation of an order; NotFound when it has none."""
    reservation = await store.get_reservation(conn, order_id)
    if reservation is None:
        raise NotFound(f"no reservation for order {order_id}")
    return reservation
