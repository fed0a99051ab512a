"""Payment's SQL, one function per query."""

from __future__ import annotations

import asyncpg
from ordermesh_shared.database import DbConn


async def list_customers(conn: DbConn) -> list[asyncpg.Record]:
    """Every customer account, by id."""
    return await conn.fetch("SELECT id, name, balance FROM customers ORDER BY id")


async def get_customer(conn: DbConn, customer_id: str) -> asyncpg.Record | None:
    """One customer account, or None."""
    return await conn.fetchrow("SELECT id, name, balance FROM customers WHERE id = $1", customer_id)
