"""GET /orders' query on a table that grew after asyncpg cached its plan: pages come newest
first, filtered and continued by cursor, reading a page's rows rather than the whole table."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from order import store
from order.app import MIGRATIONS
from ordermesh_shared.database import Database, DbConn, prepare_database
from ordermesh_shared.saga import SAGA_MIGRATIONS

pytestmark = pytest.mark.integration

ORDERS = 20_000  # ~250 heap pages


@pytest.fixture
async def db(fresh_database: str) -> AsyncIterator[Database]:
    async with Database(fresh_database) as database:
        await prepare_database(database, MIGRATIONS, extra=(SAGA_MIGRATIONS,))
        yield database


FILTERS: list[dict[str, Any]] = [
    {"status": None, "customer_id": None},
    {"status": "cancelled", "customer_id": None},
    {"status": None, "customer_id": "c7"},
    # Both: one index, the other filter checked per row (its cost follows that filter's
    # selectivity, not the table's size), so only the page's content is checked.
    {"status": "completed", "customer_id": "c3"},
]


async def test_pages_planned_on_an_empty_table_read_a_page_not_the_table(db: Database) -> None:
    async with db.pool.acquire() as conn, conn.transaction():
        # A generic plan, made now while the table is empty, as a long-lived connection
        # keeps one; the rows come in the same transaction, so no ANALYZE replans it.
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        for filters in FILTERS:
            for after in (None, await _any_cursor(conn)):
                await store.list_orders(conn, **filters, after=after, limit=20)
        await _fill(conn)
        for filters in FILTERS:
            bounded = None in filters.values()
            first, blocks = await _page(conn, filters, after=None)
            assert blocks < 100 or not bounded, f"{filters}: {blocks} heap blocks for 20 rows"
            _check_page(first, filters)
            cursor = (first[-1]["created_at"], first[-1]["id"])
            second, blocks = await _page(conn, filters, after=cursor)
            assert blocks < 100 or not bounded, f"{filters}, next page: {blocks} heap blocks"
            _check_page(second, filters)
            assert (second[0]["created_at"], second[0]["id"]) < cursor


async def _any_cursor(conn: DbConn) -> Any:
    return await conn.fetchrow("SELECT now() AS created_at, gen_random_uuid() AS id")


async def _fill(conn: DbConn) -> None:
    await conn.execute(
        "INSERT INTO orders (id, customer_id, destination, status, created_at)"
        " SELECT gen_random_uuid(), 'c' || (i % 10), 'DE',"
        "        (ARRAY['completed', 'cancelled', 'pending'])[1 + i % 3],"
        "        now() - make_interval(secs => i)"
        "   FROM generate_series(1, $1) i",
        ORDERS,
    )


async def _page(conn: DbConn, filters: dict[str, Any], *, after: Any) -> tuple[list[Any], int]:
    """A page of 20, and the heap blocks of ``orders`` it read (this transaction's count)."""
    blocks = "SELECT pg_stat_get_xact_blocks_fetched('orders'::regclass)"
    before = await conn.fetchval(blocks)
    rows = await store.list_orders(conn, **filters, after=after, limit=20)
    return rows, await conn.fetchval(blocks) - before


def _check_page(rows: list[Any], filters: dict[str, Any]) -> None:
    assert len(rows) == 20
    keys = [(r["created_at"], r["id"]) for r in rows]
    assert keys == sorted(keys, reverse=True)
    for name, value in filters.items():
        assert value is None or all(r[name] == value for r in rows)
