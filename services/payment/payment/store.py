"""Payment's SQL, one function per query: the customers, and the payments' repository."""

from __future__ import annotations

import uuid

import asyncpg
from ordermesh_shared.commands import ANSWER_COLUMNS, ANSWER_FROM, Loaded, Recorded, stored_answer
from ordermesh_shared.database import DbConn

from payment.domain import Account, Payment


async def list_customers(conn: DbConn) -> list[asyncpg.Record]:
    """Every customer account, by id."""
    return await conn.fetch("SELECT id, name, balance FROM customers ORDER BY id")


async def get_customer(conn: DbConn, customer_id: str) -> asyncpg.Record | None:
    """One customer account, or None."""
    return await conn.fetchrow("SELECT id, name, balance FROM customers WHERE id = $1", customer_id)


# -- payments: the repository of the Payment aggregate ---------------------------------------

# A payment's columns, named apart from the stored answer's and the account's in a load.
_PAYMENT = (
    "p.id AS payment_id, p.order_id, p.customer_id, p.amount, p.status, p.reason FROM payments p"
)


def _payment(row: asyncpg.Record) -> Payment | None:
    if row["payment_id"] is None:
        return None
    return Payment(
        row["payment_id"],
        row["order_id"],
        row["customer_id"],
        row["amount"],
        row["status"],
        row["reason"],
    )


async def get_payment(conn: DbConn, order_id: uuid.UUID) -> Payment | None:
    """The order's payment, or None."""
    row = await conn.fetchrow(f"SELECT {_PAYMENT} WHERE p.order_id = $1", order_id)
    return _payment(row) if row is not None else None


async def load_for_command(conn: DbConn, key: str, order_id: uuid.UUID) -> Loaded[Payment | None]:
    """The answer stored under ``key`` and the order's payment: one round trip."""
    row = await conn.fetchrow(
        f"SELECT {ANSWER_COLUMNS}, p.* FROM {ANSWER_FROM}"
        f" LEFT JOIN (SELECT {_PAYMENT}) p ON p.order_id = $2",
        key,
        order_id,
    )
    assert row is not None  # one row, whatever the joins find
    return Loaded(stored_answer(row), _payment(row))


async def load_for_charge(
    conn: DbConn, key: str, order_id: uuid.UUID, customer_id: str
) -> Loaded[tuple[Payment | None, Account | None]]:
    """As :func:`load_for_command`, plus the customer's balance: one round trip."""
    row = await conn.fetchrow(
        f"SELECT {ANSWER_COLUMNS}, p.*, c.id AS account_id, c.balance FROM {ANSWER_FROM}"
        f" LEFT JOIN (SELECT {_PAYMENT}) p ON p.order_id = $2"
        " LEFT JOIN customers c ON c.id = $3",
        key,
        order_id,
        customer_id,
    )
    assert row is not None
    account = None if row["account_id"] is None else Account(row["account_id"], row["balance"])
    return Loaded(stored_answer(row), (_payment(row), account))


async def insert_charge(conn: DbConn, payment: Payment, recorded: Recorded) -> None:
    """A charged payment taking its amount from the customer's balance, with its event and
    answer: one statement. Lost race (the balance no longer covers it, or the order got a
    payment meanwhile): nothing is written, and the command runs again."""
    await conn.execute(
        "WITH opened AS (INSERT INTO payments (id, order_id, customer_id, amount, status)"
        "   VALUES ($1, $2, $3, $4, 'charged') RETURNING customer_id, amount),"
        # The guarded UPDATE is the concurrency story: the row lock orders racing charges
        # of one customer, and `balance >= amount` keeps the balance from going negative.
        " debited AS (UPDATE customers c SET balance = c.balance - o.amount FROM opened o"
        "   WHERE c.id = o.customer_id AND c.balance >= o.amount RETURNING 1),"
        f" {recorded.ctes('debited', 5)}"
        f" SELECT CASE WHEN EXISTS (SELECT 1 FROM debited) THEN {recorded.check}"
        "   ELSE command_raced()::int END",
        payment.id,
        payment.order_id,
        payment.customer_id,
        payment.amount,
        *recorded.args,
    )


async def insert_payment(conn: DbConn, payment: Payment, recorded: Recorded) -> None:
    """A payment that moves no money (declined, or the voided marker), with its event, if
    any, and answer: one statement. Lost race (the order got a payment meanwhile, or the
    balance grew to cover a declined amount): nothing is written; the command reruns."""
    await conn.execute(
        "WITH opened AS (INSERT INTO payments (id, order_id, customer_id, amount, status, reason)"
        "   SELECT $1, $2, $3, $4, $5, $6"
        # A decline stands only while the balance is still short (a marker has no customer).
        "   WHERE NOT EXISTS (SELECT 1 FROM customers WHERE id = $3 AND balance >= $4)"
        "   RETURNING id),"
        f" {recorded.ctes('opened', 7)}"
        f" SELECT CASE WHEN EXISTS (SELECT 1 FROM opened) THEN {recorded.check}"
        "   ELSE command_raced()::int END",
        payment.id,
        payment.order_id,
        payment.customer_id,
        payment.amount,
        payment.status,
        payment.reason,
        *recorded.args,
    )


async def refund_charge(conn: DbConn, payment: Payment, recorded: Recorded) -> None:
    """A charged payment refunded (``payment`` is the new state): its amount goes back to
    the customer, with the event and the answer, in one statement. Lost race (it is no
    longer charged): nothing is written; the command reruns."""
    await conn.execute(
        "WITH settled AS (UPDATE payments SET status = 'refunded', updated_at = now()"
        "   WHERE id = $1 AND status = 'charged' RETURNING customer_id, amount),"
        " credited AS (UPDATE customers c SET balance = c.balance + s.amount FROM settled s"
        "   WHERE c.id = s.customer_id RETURNING 1),"
        f" {recorded.ctes('credited', 2)}"
        f" SELECT CASE WHEN EXISTS (SELECT 1 FROM credited) THEN {recorded.check}"
        "   ELSE command_raced()::int END",
        payment.id,
        *recorded.args,
    )
