"""Shipping's SQL, one function per query: the destinations, and the shipments' repository."""

from __future__ import annotations

import uuid

import asyncpg
from ordermesh_shared.commands import ANSWER_COLUMNS, ANSWER_FROM, Loaded, Recorded, stored_answer
from ordermesh_shared.database import DbConn

from shipping.domain import Destination, Shipment

_SHIPMENT_COLUMNS = "id, order_id, destination, status, created_at, updated_at"
# The same, of the shipment a command's load joins (as ``s``) beside the stored answer.
_JOINED_SHIPMENT = ", ".join(f"s.{column}" for column in _SHIPMENT_COLUMNS.split(", "))


async def list_destinations(conn: DbConn) -> list[asyncpg.Record]:
    """Every known destination, supported or not, by code."""
    return await conn.fetch("SELECT code, name, supported FROM destinations ORDER BY code")


# -- shipments: the repository of the Shipment aggregate --------------------------------------


def _shipment(row: asyncpg.Record) -> Shipment | None:
    if row["id"] is None:
        return None
    return Shipment(
        row["id"],
        row["order_id"],
        row["destination"],
        row["status"],
        row["created_at"],
        row["updated_at"],
    )


async def get_shipment(conn: DbConn, shipment_id: uuid.UUID) -> Shipment | None:
    """One shipment, or None."""
    row = await conn.fetchrow(
        f"SELECT {_SHIPMENT_COLUMNS} FROM shipments WHERE id = $1", shipment_id
    )
    return _shipment(row) if row is not None else None


async def shipment_of_order(conn: DbConn, order_id: uuid.UUID) -> Shipment | None:
    """The order's shipment, or None."""
    row = await conn.fetchrow(
        f"SELECT {_SHIPMENT_COLUMNS} FROM shipments WHERE order_id = $1", order_id
    )
    return _shipment(row) if row is not None else None


async def load_for_command(conn: DbConn, key: str, order_id: uuid.UUID) -> Loaded[Shipment | None]:
    """The answer stored under ``key`` and the order's shipment: one round trip."""
    row = await conn.fetchrow(
        f"SELECT {ANSWER_COLUMNS}, {_JOINED_SHIPMENT}"
        f" FROM {ANSWER_FROM} LEFT JOIN shipments s ON s.order_id = $2",
        key,
        order_id,
    )
    assert row is not None  # one row, whatever the joins find
    return Loaded(stored_answer(row), _shipment(row))


async def load_for_create(
    conn: DbConn, key: str, order_id: uuid.UUID, destination: str
) -> Loaded[tuple[Shipment | None, Destination]]:
    """As :func:`load_for_command`, plus whether we ship to ``destination``: one round trip."""
    row = await conn.fetchrow(
        f"SELECT {ANSWER_COLUMNS}, {_JOINED_SHIPMENT}, coalesce((SELECT d.supported"
        "   FROM destinations d WHERE d.code = $3), false) AS supported"
        f" FROM {ANSWER_FROM} LEFT JOIN shipments s ON s.order_id = $2",
        key,
        order_id,
        destination,
    )
    assert row is not None
    return Loaded(stored_answer(row), (_shipment(row), Destination(destination, row["supported"])))


async def insert_shipment(conn: DbConn, shipment: Shipment, recorded: Recorded) -> None:
    """A new shipment (or the marker of a cancel that came first), with its event and answer:
    one statement. Lost race (the order got a shipment meanwhile: the unique order id, or the
    destination is no longer supported): nothing is written, and the command runs again."""
    await conn.execute(
        "WITH opened AS (INSERT INTO shipments"
        "   (id, order_id, destination, status, created_at, updated_at)"
        "   SELECT $1::uuid, $2::uuid, $3::text, $4::text, $5::timestamptz, $6::timestamptz"
        # A marker has no destination; a shipment goes only where we still ship.
        "   WHERE $3::text IS NULL"
        "     OR EXISTS (SELECT 1 FROM destinations WHERE code = $3 AND supported)"
        "   RETURNING id),"
        f" {recorded.ctes('opened', 7)}"
        f" SELECT CASE WHEN EXISTS (SELECT 1 FROM opened) THEN {recorded.check}"
        "   ELSE command_raced()::int END",
        shipment.id,
        shipment.order_id,
        shipment.destination,
        shipment.status,
        shipment.created_at,
        shipment.updated_at,
        *recorded.args,
    )


async def cancel_shipment(conn: DbConn, shipment: Shipment, recorded: Recorded) -> None:
    """A created shipment cancelled (``shipment`` is the new state), with its event and the
    answer, in one statement. Lost race (it is no longer created): nothing is written; the
    command reruns."""
    await conn.execute(
        "WITH cancelled AS (UPDATE shipments SET status = 'cancelled', updated_at = $2"
        "   WHERE id = $1 AND status = 'created' RETURNING id),"
        f" {recorded.ctes('cancelled', 3)}"
        f" SELECT CASE WHEN EXISTS (SELECT 1 FROM cancelled) THEN {recorded.check}"
        "   ELSE command_raced()::int END",
        shipment.id,
        shipment.updated_at,
        *recorded.args,
    )
