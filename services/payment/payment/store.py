"""Payment's SQL, one function per query."""

from __future__ import annotations

import uuid
from decimal import Decimal

import asyncpg
from ordermesh_shared.database import DbConn

_PAYMENT_COLUMNS = "id, order_id, customer_id, amount, status, reason"


async def list_customers(conn: DbConn) -> list[asyncpg.Record]:
    """Every customer account, by id."""
    return await conn.fetch("SELECT id, name, balance FROM customers ORDER BY id")


async def get_customer(conn: DbConn, customer_id: str) -> asyncpg.Record | None:
    """One customer account, or None."""
    return await conn.fetchrow("SELECT id, name, balance FROM customers WHERE id = $1", customer_id)


async def lock_payment(conn: DbConn, order_id: uuid.UUID) -> asyncpg.Record | None:
    """The order's payment, locked until the transaction ends."""
    return await conn.fetchrow(
        f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE order_id = $1 FOR UPDATE", order_id
    )


async def get_payment(conn: DbConn, order_id: uuid.UUID) -> asyncpg.Record | None:
    """The order's payment, or None."""
    return await conn.fetchrow(
        f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE order_id = $1", order_id
    )


async def debit(conn: DbConn, customer_id: str, amount: Decimal) -> bool:
    """Take ``amount`` from the balance if it covers it (never an overdraft)."""
    done = await conn.fetchval(
        "UPDATE customers SET balance = balance - $2 WHERE id = $1 AND balance >= $2 RETURNING 1",
        customer_id,
        amount,
    )
    return done is not None


async def credit(conn: DbConn, customer_id: str, amount: Decimal) -> None:
    """Give ``amount`` back."""
    await conn.execute(
        "UPDATE customers SET balance = balance + $2 WHERE id = $1", customer_id, amount
    )


async def insert_payment(
    conn: DbConn,
    order_id: uuid.UUID,
    *,
    customer_id: str | None,
    amount: Decimal,
    status: str,
    reason: str | None = None,
) -> asyncpg.Record:
    """A new payment row for the order, as stored."""
    row = await conn.fetchrow(
        "INSERT INTO payments (id, order_id, customer_id, amount, status, reason)"
        f" VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_PAYMENT_COLUMNS}",
        uuid.uuid4(),
        order_id,
        customer_id,
        amount,
        status,
        reason,
    )
    assert row is not None  # RETURNING: the row just written
    return row


async def set_status(conn: DbConn, order_id: uuid.UUID, status: str) -> asyncpg.Record:
    """Move the order's payment to a new status; the payment as stored now."""
    row = await conn.fetchrow(
        f"UPDATE payments SET status = $2, updated_at = now() WHERE order_id = $1"
        f" RETURNING {_PAYMENT_COLUMNS}",
        order_id,
        status,
    )
    assert row is not None  # RETURNING: the row just written
    return row
