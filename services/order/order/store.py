"""Order's SQL, one function per query."""

from __future__ import annotations

import uuid

import asyncpg
from ordermesh_shared.database import DbConn


async def get_order(conn: DbConn, order_id: uuid.UUID) -> asyncpg.Record | None:
    """One order's header row, or None."""
    return await conn.fetchrow(
        "SELECT id, customer_id, destination, status, total, failure_reason, created_at, updated_at"
        " FROM orders WHERE id = $1",
        order_id,
    )


async def get_order_items(conn: DbConn, order_id: uuid.UUID) -> list[asyncpg.Record]:
    """The lines of one order, by SKU."""
    return await conn.fetch(
        "SELECT sku, quantity, unit_price FROM order_items WHERE order_id = $1 ORDER BY sku",
        order_id,
    )
