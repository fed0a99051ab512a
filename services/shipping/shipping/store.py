"""Shipping's SQL, one function per query."""

from __future__ import annotations

import uuid

import asyncpg
from ordermesh_shared.database import DbConn


async def list_destinations(conn: DbConn) -> list[asyncpg.Record]:
    """Every known destination, supported or not, by code."""
    return await conn.fetch("SELECT code, name, supported FROM destinations ORDER BY code")


async def get_shipment(conn: DbConn, shipment_id: uuid.UUID) -> asyncpg.Record | None:
    """One shipment, or None."""
    return await conn.fetchrow(
        "SELECT id, order_id, destination, status, created_at, updated_at"
        " FROM shipments WHERE id = $1",
        shipment_id,
    )
