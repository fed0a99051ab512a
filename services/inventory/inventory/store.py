"""Inventory's SQL, one function per query."""

from __future__ import annotations

import asyncpg
from ordermesh_shared.database import DbConn

_PRODUCT_COLUMNS = "sku, name, price, available, reserved, committed"


async def list_products(conn: DbConn) -> list[asyncpg.Record]:
    """Every product, by SKU."""
    return await conn.fetch(f"SELECT {_PRODUCT_COLUMNS} FROM products ORDER BY sku")


async def get_product(conn: DbConn, sku: str) -> asyncpg.Record | None:
    """One product, or None."""
    return await conn.fetchrow(f"SELECT {_PRODUCT_COLUMNS} FROM products WHERE sku = $1", sku)
