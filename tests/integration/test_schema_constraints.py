"""The schema's own guards, tested directly: each write that breaks one is refused by
Postgres, naming the constraint. The commands never attempt these writes (their tests show
that), so only these tests notice when a migration loses a guard."""

from __future__ import annotations

import asyncpg
import pytest
from inventory.app import SPEC as INVENTORY
from ordermesh_shared.bootstrap import ServiceSpec
from ordermesh_shared.database import Database, prepare_database
from payment.app import SPEC as PAYMENT
from shipping.app import SPEC as SHIPPING

pytestmark = pytest.mark.integration

SPECS = {"inventory": INVENTORY, "payment": PAYMENT, "shipping": SHIPPING}
ORDER = "'6f1c2d1e-0000-4000-8000-000000000001'"
RESERVATION = (
    "INSERT INTO reservations (id, order_id, status) VALUES"
    f" (gen_random_uuid(), {ORDER}, 'released')"
)

CASES = [
    # service, constraint, a write it must refuse
    (
        "inventory",
        "products_available_check",
        "UPDATE products SET available = -1, stocked = reserved + committed - 1"
        " WHERE sku = 'LS-606'",
    ),
    (
        "inventory",
        "products_reserved_check",
        "UPDATE products SET reserved = -1, available = available + 1 WHERE sku = 'KB-101'",
    ),
    (
        "inventory",
        "products_committed_check",
        "UPDATE products SET committed = -1, available = available + 1 WHERE sku = 'KB-101'",
    ),
    # A unit lost (or made) without a restock.
    ("inventory", "stock_conserved", "UPDATE products SET available = available - 1"),
    ("inventory", "reservations_order_id_key", f"{RESERVATION}; {RESERVATION}"),
    ("payment", "customers_balance_check", "UPDATE customers SET balance = balance - 20.01"),
    (
        "payment",
        "payments_amount_check",
        "INSERT INTO payments (id, order_id, customer_id, amount, status) VALUES"
        f" (gen_random_uuid(), {ORDER}, 'dave', -1, 'charged')",
    ),
    (
        "payment",
        "payments_order_id_key",
        "INSERT INTO payments (id, order_id, customer_id, amount, status)"
        f" SELECT gen_random_uuid(), {ORDER}, 'dave', 1, 'charged' FROM generate_series(1, 2)",
    ),
    (
        "shipping",
        "shipments_order_id_key",
        "INSERT INTO shipments (id, order_id, status)"
        f" SELECT gen_random_uuid(), {ORDER}, 'cancelled' FROM generate_series(1, 2)",
    ),
]


async def migrated(spec: ServiceSpec, dsn: str) -> None:
    async with Database(dsn) as database:
        await prepare_database(database, spec.migrations, extra=spec.extra_migrations)


@pytest.mark.parametrize(("service", "constraint", "sql"), CASES, ids=[c[1] for c in CASES])
async def test_the_schema_refuses_a_write_that_breaks(
    fresh_database: str, service: str, constraint: str, sql: str
) -> None:
    await migrated(SPECS[service], fresh_database)
    conn = await asyncpg.connect(fresh_database)
    try:
        with pytest.raises(asyncpg.IntegrityConstraintViolationError) as refused:
            await conn.execute(sql)
    finally:
        await conn.close()
    assert refused.value.constraint_name == constraint
