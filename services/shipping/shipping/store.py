"""Shipping's SQL, one function per query."""

from __future__ import annotations

import uuid

import asyncpg
from ordermesh_shared.database import DbConn

_SHIPMENT_COLUMNS = "id, order_id, destination, status, created_at, updated_at"


async def list_destinations(conn: DbConn) -> list[asyncpg.Record]:
    """Every known destination, supported or not, by code."""
    return await conn.fetch("SELECT code, name, supported FROM destinations ORDER BY code")


async def is_supported(conn: DbConn, code: str) -> bool:
    """True if we ship to ``code``."""
    return bool(await conn.fetchval("SELECT supported FROM destinations WHERE code = $1", code))


async def get_shipment(conn: DbConn, shipment_id: uuid.UUID) -> asyncpg.Record | None:
    """One shipment, or None."""
    return await conn.fetchrow(
        f"SELECT {_SHIPMENT_COLUMNS} FROM shipments WHERE id = $1", shipment_id
    )


async def shipment_of_order(conn: DbConn, order_id: uuid.UUID) -> asyncpg.Record | None:
    """The order's shipment, or None."""
    return await conn.fetchrow(
        f"SELECT {_SHIPMENT_COLUMNS} FROM shipments WHERE order_id = $1", order_id
    )


async def lock_shipment(conn: DbConn, order_id: uuid.UUID) -> asyncpg.Record | None:
    """The order's shipment, locked until the transaction ends."""
    return await conn.fetchrow(
        f"SELECT {_SHIPMENT_COLUMNS} FROM shipments WHERE order_id = $1 FOR UPDATE", order_id
    )


async def insert_shipment(
    conn: DbConn, order_id: uuid.UUID, destination: str | None, status: str
) -> asyncpg.Record:
    """A new shipment row for the order, as stored."""
    row = await conn.fetchrow(
        "INSERT INTO shipments (id, order_id, destination, status) VALUES ($1, $2, $3, $4)"
        f" RETURNING {_SHIPMENT_COLUMNS}",
        uuid.uuid4(),
        order_id,
        destination,
        status,
    )
    assert row is not None  # RETURNING: the row just written
    return row


async def cancel(conn: DbConn, order_id: uuid.UUID) -> asyncpg.Record:
    """Mark the order's shipment cancelled; the shipment as stored now."""
    row = await conn.fetchrow(
        "UPDATE shipments SET status = 'cancelled', updated_at = now() WHERE order_id = $1"
        f" RETURNING {_SHIPMENT_COLUMNS}",
        order_id,
    )
    assert row is not None  # RETURNING: the row just written
    return row
