"""Inventory's SQL, one function per query."""

from __future__ import annotations

import uuid
from decimal import Decimal

import asyncpg
from ordermesh_shared.database import DbConn

_PRODUCT_COLUMNS = "sku, name, price, available, reserved, committed, stocked"


async def list_products(conn: DbConn) -> list[asyncpg.Record]:
    """Every product, by SKU."""
    return await conn.fetch(f"SELECT {_PRODUCT_COLUMNS} FROM products ORDER BY sku")


async def get_product(conn: DbConn, sku: str) -> asyncpg.Record | None:
    """One product, or None."""
    return await conn.fetchrow(f"SELECT {_PRODUCT_COLUMNS} FROM products WHERE sku = $1", sku)


async def lock_reservation(conn: DbConn, order_id: uuid.UUID) -> asyncpg.Record | None:
    """The order's reservation, locked until the transaction ends."""
    return await conn.fetchrow(
        "SELECT id, order_id, status FROM reservations WHERE order_id = $1 FOR UPDATE", order_id
    )


async def get_reservation(conn: DbConn, order_id: uuid.UUID) -> asyncpg.Record | None:
    """The order's reservation, or None."""
    return await conn.fetchrow(
        "SELECT id, order_id, status FROM reservations WHERE order_id = $1", order_id
    )


async def reservation_items(conn: DbConn, reservation_id: uuid.UUID) -> list[asyncpg.Record]:
    """The lines of a reservation, by SKU in code point order (as reserve_stock takes them,
    so a retried reserve answers with its lines in the order of the first answer)."""
    return await conn.fetch(
        "SELECT sku, quantity, unit_price FROM reservation_items"
        ' WHERE reservation_id = $1 ORDER BY sku COLLATE "C"',
        reservation_id,
    )


async def reserve_line(
    conn: DbConn, reservation_id: uuid.UUID, sku: str, quantity: int
) -> Decimal | None:
    """Move units from available to reserved and record the line, in one statement; the unit
    price, or None (and nothing written) when there are not enough units (or no such SKU).

    The guarded UPDATE is the whole concurrency story: the row lock orders racing
    reservations and ``available >= $3`` keeps stock from going negative.
    """
    price: Decimal | None = await conn.fetchval(
        "WITH taken AS (UPDATE products SET available = available - $3, reserved = reserved + $3"
        "   WHERE sku = $2 AND available >= $3 RETURNING price)"
        " INSERT INTO reservation_items (reservation_id, sku, quantity, unit_price)"
        " SELECT $1, $2, $3, price FROM taken RETURNING unit_price",
        reservation_id,
        sku,
        quantity,
    )
    return price


async def return_stock(conn: DbConn, sku: str, quantity: int) -> None:
    """Move units from reserved back to available."""
    await conn.execute(
        "UPDATE products SET available = available + $2, reserved = reserved - $2 WHERE sku = $1",
        sku,
        quantity,
    )


async def sell_stock(conn: DbConn, sku: str, quantity: int) -> None:
    """Move units from reserved to committed."""
    await conn.execute(
        "UPDATE products SET committed = committed + $2, reserved = reserved - $2 WHERE sku = $1",
        sku,
        quantity,
    )


async def open_reservation(
    conn: DbConn, reservation_id: uuid.UUID, order_id: uuid.UUID, status: str = "reserved"
) -> bool:
    """A new reservation ('released' marks a release that came before any reserve); False
    when the order already has one - which a concurrent transaction may have just committed:
    a next statement (:func:`lock_reservation`) sees it."""
    opened = await conn.fetchval(
        "INSERT INTO reservations (id, order_id, status) VALUES ($1, $2, $3)"
        " ON CONFLICT (order_id) DO NOTHING RETURNING true",
        reservation_id,
        order_id,
        status,
    )
    return bool(opened)


async def set_status(conn: DbConn, reservation_id: uuid.UUID, status: str) -> None:
    """Move a reservation to a new status."""
    await conn.execute(
        "UPDATE reservations SET status = $2, updated_at = now() WHERE id = $1",
        reservation_id,
        status,
    )
