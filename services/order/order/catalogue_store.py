"""The catalogue replica's SQL, one function per query (the table: migrations/0006)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
from ordermesh_shared.database import DbConn

from order.domain import ProductFact

# Each fact is written only over an older version of its product: the replica never goes
# back, whatever order events and snapshots arrive in, and applying one twice changes nothing.
_UPSERT = (
    "incoming AS (SELECT * FROM unnest($1::text[], $2::text[], $3::numeric[], $4::int[],"
    "   $5::bigint[], $6::timestamptz[]) AS f(sku, name, price, available, version, changed_at)),"
    " applied AS (INSERT INTO catalogue_products AS c"
    "   (sku, name, price, available, version, changed_at) SELECT * FROM incoming"
    "   ON CONFLICT (sku) DO UPDATE SET name = excluded.name, price = excluded.price,"
    "     available = excluded.available, version = excluded.version,"
    "     changed_at = excluded.changed_at, applied_at = now(),"
    "     applied_seq = nextval('catalogue_applied_seq')"
    "   WHERE c.version < excluded.version RETURNING c.sku)"
)


def _columns(facts: Sequence[ProductFact]) -> list[list[Any]]:
    return [
        [f.sku for f in facts],
        [f.name for f in facts],
        [f.price for f in facts],
        [f.available for f in facts],
        [f.version for f in facts],
        [f.changed_at for f in facts],
    ]


async def apply_events(conn: DbConn, facts: Sequence[ProductFact]) -> int:
    """Facts from product_changed events (one per SKU: a statement updates a row once); the
    newest event time seen is the replica's ``last_event_at``. Returns the facts applied."""
    applied: int = await conn.fetchval(
        f"WITH {_UPSERT}, seen AS (UPDATE catalogue_state"
        "   SET last_event_at = greatest(last_event_at, (SELECT max(changed_at) FROM incoming))"
        "   RETURNING 1)"  # a data-modifying CTE runs whether selected from or not
        " SELECT count(*) FROM applied",
        *_columns(facts),
    )
    return applied


async def apply_snapshot(conn: DbConn, facts: Sequence[ProductFact], *, taken_at: datetime) -> int:
    """Facts from inventory's snapshot, read at ``taken_at``: from now on the replica is
    filled. Returns the facts applied (newer than what the replica had)."""
    applied: int = await conn.fetchval(
        f"WITH {_UPSERT}, filled AS (UPDATE catalogue_state"
        "   SET snapshot_at = greatest(snapshot_at, $7) RETURNING 1)"
        " SELECT count(*) FROM applied",
        *_columns(facts),
        taken_at,
    )
    return applied


_PRODUCTS_JSON = (
    "coalesce(json_agg(json_build_object('sku', c.sku, 'name', c.name,"
    " 'price', c.price::text, 'available', c.available, 'version', c.version,"
    """ 'changed_at', c.changed_at) ORDER BY c.sku COLLATE "C"), '[]')::text"""
)
_STATE = "s.snapshot_at, s.last_event_at, now() AS now"


async def read_catalogue(conn: DbConn, sku: str | None = None) -> asyncpg.Record:
    """The replica's freshness with its products (``products``, JSON text), or only ``sku``'s
    (the catalogue is small: one plan for both is fine)."""
    row = await conn.fetchrow(
        f"SELECT {_STATE}, (SELECT {_PRODUCTS_JSON} FROM catalogue_products c"
        "   WHERE $1::text IS NULL OR c.sku = $1) AS products FROM catalogue_state s",
        sku,
    )
    assert row is not None  # catalogue_state has its one row from the migration
    return row


async def changed_since(conn: DbConn, applied_seq: int) -> asyncpg.Record:
    """As :func:`read_catalogue`, with only the products written after ``applied_seq`` and
    the highest ``applied_seq`` (``seq``) among them."""
    row = await conn.fetchrow(
        f"SELECT {_STATE}, (SELECT {_PRODUCTS_JSON} FROM catalogue_products c"
        "   WHERE c.applied_seq > $1) AS products,"
        " (SELECT max(applied_seq) FROM catalogue_products WHERE applied_seq > $1) AS seq"
        " FROM catalogue_state s",
        applied_seq,
    )
    assert row is not None
    return row
