"""Inventory's SQL, one function per query: the products, their catalogue facts (events and
snapshot), and the reservations' repository."""

from __future__ import annotations

import uuid
from decimal import Decimal

import asyncpg
import orjson
from ordermesh_shared.commands import ANSWER_COLUMNS, ANSWER_FROM, Loaded, Recorded, stored_answer
from ordermesh_shared.database import DbConn
from ordermesh_shared.outbox.store import NOTIFY_CHANNEL, traced_json

from inventory.domain import Reservation, ReservedLine, Stock

_PRODUCT_COLUMNS = "sku, name, price, available, reserved, committed, stocked"


async def list_products(conn: DbConn) -> list[asyncpg.Record]:
    """Every product, by SKU."""
    return await conn.fetch(f"SELECT {_PRODUCT_COLUMNS} FROM products ORDER BY sku")


async def get_product(conn: DbConn, sku: str) -> asyncpg.Record | None:
    """One product, or None."""
    return await conn.fetchrow(f"SELECT {_PRODUCT_COLUMNS} FROM products WHERE sku = $1", sku)


# -- the catalogue's facts: product_changed events and the snapshot -------------------------

PRODUCT_CHANGED = "product_changed"
# What a statement that changes a product's catalogue facts returns of it, for its event.
_FACTS = "p.sku, p.name, p.price, p.available, p.version"


def _product_events(changed: str, headers: int) -> str:
    """CTE ``product_events``: one product_changed outbox row (aggregate: the SKU) per row the
    CTE ``changed`` returned (:data:`_FACTS`, after the change), with parameter ``headers``
    (:func:`traced_json`: the trace the change happened in) as their headers. The change's
    UPDATE holds the product's row lock until commit, so per SKU the outbox ids, like the
    versions, follow commit order."""
    return (
        "product_events AS (INSERT INTO outbox (event_id, aggregate_type, aggregate_id,"
        " event_type, payload, headers) SELECT gen_random_uuid(), 'product', c.sku,"
        f" '{PRODUCT_CHANGED}', jsonb_build_object('sku', c.sku, 'name', c.name,"
        "   'price', c.price::text, 'available', c.available, 'version', c.version),"
        f" ${headers}::jsonb FROM {changed} c ORDER BY c.sku RETURNING id)"
    )


async def set_price(conn: DbConn, sku: str, price: Decimal) -> asyncpg.Record | None:
    """Change a product's price with its product_changed event, in one statement; the product
    as it is now, or None for an unknown SKU. The same price again changes nothing and writes
    no event."""
    return await conn.fetchrow(
        "WITH changed AS (UPDATE products p SET price = $2, version = p.version + 1"
        f"   WHERE p.sku = $1 AND p.price <> $2 RETURNING p.*), {_product_events('changed', 3)},"
        # Selected below so that it runs: the relay wakes up at commit.
        f" woken AS (SELECT pg_notify('{NOTIFY_CHANNEL}', id::text) FROM product_events)"
        f" SELECT {_PRODUCT_COLUMNS}, (SELECT count(*) FROM woken) AS notified FROM changed"
        # The statement does not see its own UPDATE: unchanged, the row is read as it was.
        f" UNION ALL SELECT {_PRODUCT_COLUMNS}, 0 FROM products"
        "   WHERE sku = $1 AND NOT EXISTS (SELECT 1 FROM changed)",
        sku,
        price,
        traced_json(),
    )


async def catalogue_snapshot(conn: DbConn) -> asyncpg.Record:
    """Every product's catalogue facts with its version, and the time they were read: one
    statement, so one consistent view of all of them."""
    row = await conn.fetchrow(
        "SELECT now() AS taken_at, coalesce(json_agg(json_build_object('sku', p.sku,"
        " 'name', p.name, 'price', p.price::text, 'available', p.available,"
        """ 'version', p.version) ORDER BY p.sku COLLATE "C"), '[]')::text AS products"""
        " FROM products p"
    )
    assert row is not None  # an aggregate: one row, products or not
    return row


# -- reservations: the repository of the Reservation aggregate -------------------------------

# A reservation and its lines (unit prices as text: JSON numbers would become floats).
_RESERVATION = (
    "SELECT r.id, r.order_id, r.status, (SELECT coalesce(json_agg(json_build_object("
    "'sku', i.sku, 'quantity', i.quantity, 'unit_price', i.unit_price::text)"
    """ ORDER BY i.sku COLLATE "C"), '[]') FROM reservation_items i"""
    " WHERE i.reservation_id = r.id) AS lines FROM reservations r"
)


def _reservation(row: asyncpg.Record) -> Reservation | None:
    if row["id"] is None:
        return None
    lines = tuple(
        ReservedLine(line["sku"], line["quantity"], Decimal(line["unit_price"]))
        for line in orjson.loads(row["lines"])
    )
    return Reservation(row["id"], row["order_id"], row["status"], lines)


async def get_reservation(conn: DbConn, order_id: uuid.UUID) -> Reservation | None:
    """The order's reservation, or None."""
    row = await conn.fetchrow(f"{_RESERVATION} WHERE r.order_id = $1", order_id)
    return _reservation(row) if row is not None else None


async def load_for_command(
    conn: DbConn, key: str, order_id: uuid.UUID
) -> Loaded[Reservation | None]:
    """The answer stored under ``key`` and the order's reservation: one round trip."""
    row = await conn.fetchrow(
        f"SELECT {ANSWER_COLUMNS}, r.* FROM {ANSWER_FROM}"
        f" LEFT JOIN ({_RESERVATION}) r ON r.order_id = $2",
        key,
        order_id,
    )
    assert row is not None  # one row, whatever the joins find
    return Loaded(stored_answer(row), _reservation(row))


async def load_for_reserve(
    conn: DbConn, key: str, order_id: uuid.UUID, skus: list[str]
) -> Loaded[tuple[Reservation | None, dict[str, Stock]]]:
    """As :func:`load_for_command`, plus the stock of ``skus``: one round trip."""
    row = await conn.fetchrow(
        f"SELECT {ANSWER_COLUMNS}, r.*, (SELECT coalesce(json_agg(json_build_object("
        "'sku', p.sku, 'price', p.price::text, 'available', p.available)), '[]')"
        "   FROM products p WHERE p.sku = ANY($3::text[])) AS stock"
        f" FROM {ANSWER_FROM} LEFT JOIN ({_RESERVATION}) r ON r.order_id = $2",
        key,
        order_id,
        skus,
    )
    assert row is not None
    stock = {
        p["sku"]: Stock(p["sku"], Decimal(p["price"]), p["available"])
        for p in orjson.loads(row["stock"])
    }
    return Loaded(stored_answer(row), (_reservation(row), stock))


async def insert_reservation(conn: DbConn, reservation: Reservation, recorded: Recorded) -> None:
    """A new reservation taking its lines' units from stock, with its event and answer: one
    statement. Lost race (stock taken or a price changed since the load, or the order got a
    reservation meanwhile): nothing is written, and the command runs again."""
    lines = reservation.lines
    recorded_args = recorded.args
    headers = 8 + len(recorded_args)  # the parameter after the recorded ones
    await conn.execute(
        "WITH opened AS (INSERT INTO reservations (id, order_id, status) VALUES ($1, $2, $3)"
        "   RETURNING id),"
        " wanted AS (SELECT * FROM unnest($4::text[], $5::int[], $6::numeric[])"
        "   AS w(sku, quantity, unit_price)),"
        # The guarded UPDATE is the concurrency story: the row lock orders racing
        # reservations, and `available >= quantity` keeps stock from going negative.
        " taken AS (UPDATE products p SET available = p.available - w.quantity,"
        "   reserved = p.reserved + w.quantity, version = p.version + 1 FROM wanted w, opened"
        "   WHERE p.sku = w.sku AND p.available >= w.quantity AND p.price = w.unit_price"
        f"   RETURNING {_FACTS}), {_product_events('taken', headers)},"
        " items AS (INSERT INTO reservation_items (reservation_id, sku, quantity, unit_price)"
        "   SELECT opened.id, w.sku, w.quantity, w.unit_price FROM opened, wanted w),"
        f" {recorded.ctes('opened', 8)}"
        f" SELECT CASE WHEN (SELECT count(*) FROM taken) = $7 THEN {recorded.check}"
        "   ELSE command_raced()::int END",
        reservation.id,
        reservation.order_id,
        reservation.status,
        [line.sku for line in lines],
        [line.quantity for line in lines],
        [line.unit_price for line in lines],
        len(lines),
        *recorded_args,
        traced_json(),
    )


# Where a reservation's units go when it leaves 'reserved'.
_BUCKET = {"released": "available", "committed": "committed"}
# Catalogue facts change with the units available: a release gives some back (a new version
# and a product_changed event); a commit moves held units to sold, leaving available as is.
_MOVED_FACTS = {
    "available": (", version = p.version + 1", f" RETURNING {_FACTS}"),
    "committed": ("", ""),
}


async def settle_reservation(conn: DbConn, reservation: Reservation, recorded: Recorded) -> None:
    """A reserved reservation released or committed (``reservation`` is the new state): its
    units leave ``reserved`` for their bucket, with the event and the answer, in one
    statement. Lost race (it is no longer reserved): nothing is written; the command reruns."""
    bucket = _BUCKET[reservation.status]
    version, facts = _MOVED_FACTS[bucket]
    recorded_args = recorded.args
    headers = 5 + len(recorded_args)  # the parameter after the recorded ones, when used
    events = f" {_product_events('moved', headers)}," if facts else ""
    await conn.execute(
        "WITH settled AS (UPDATE reservations SET status = $2, updated_at = now()"
        "   WHERE id = $1 AND status = 'reserved' RETURNING id),"
        f" moved AS (UPDATE products p SET {bucket} = p.{bucket} + l.quantity,"
        f"   reserved = p.reserved - l.quantity{version}"
        "   FROM unnest($3::text[], $4::int[]) AS l(sku, quantity), settled WHERE p.sku = l.sku"
        f"{facts}),{events}"
        f" {recorded.ctes('settled', 5)}"
        f" SELECT CASE WHEN EXISTS (SELECT 1 FROM settled) THEN {recorded.check}"
        "   ELSE command_raced()::int END",
        reservation.id,
        reservation.status,
        [line.sku for line in reservation.lines],
        [line.quantity for line in reservation.lines],
        *recorded_args,
        *([traced_json()] if facts else []),
    )
