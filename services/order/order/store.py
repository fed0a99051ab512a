"""Order's SQL, one function per query."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
from ordermesh_shared.database import DbConn
from ordermesh_shared.outbox.store import event_ctes
from ordermesh_shared.saga.engine import PreparedSaga

from order.domain import PlaceOrderRequest, Quote

_ORDER_COLUMNS = (
    "id, customer_id, destination, status, total, failure_reason, created_at, updated_at"
)


async def place_order(
    conn: DbConn,
    order_id: uuid.UUID,
    request: PlaceOrderRequest,
    quoted: Quote,
    *,
    idempotency_key: str | None,
    request_hash: str,
    saga: PreparedSaga,
) -> bool:
    """A new pending order with its lines (and their quoted prices), its saga and its
    ``order.created`` event, in one statement (one round trip, all or nothing); False, and
    nothing written, when the idempotency key already names another order.

    ON CONFLICT waits for a concurrent insert with the same key to commit, so racing posts
    of one key end with one order.
    """
    saga_sql, saga_args = saga.ctes("header", 9)
    payload = {"order_id": str(order_id), **request.model_dump(mode="json")}
    after_saga = 9 + len(saga_args)
    event_sql, event_args = event_ctes(
        uuid.uuid4(), "order", str(order_id), "created", payload, after="header", first=after_saga
    )
    inserted = await conn.fetchval(
        "WITH header AS (INSERT INTO orders"
        "   (id, customer_id, destination, status, idempotency_key, request_hash)"
        "   VALUES ($1, $2, $3, 'pending', $4, $5)"
        "   ON CONFLICT (idempotency_key) DO NOTHING RETURNING id),"
        " lines AS (INSERT INTO order_items (order_id, sku, quantity, quoted_price)"
        "   SELECT header.id, line.sku, line.quantity, line.quoted FROM header,"
        "     unnest($6::text[], $7::int[], $8::numeric[]) AS line(sku, quantity, quoted)),"
        f" {saga_sql}, {event_sql}"
        " SELECT count(*) + (SELECT count(*) FROM woken) FROM header",
        order_id,
        request.customer_id,
        request.destination,
        idempotency_key,
        request_hash,
        [line.sku for line in request.items],
        [line.quantity for line in request.items],
        [quoted.price_of(line.sku) for line in request.items],
        *saga_args,
        *event_args,
    )
    return bool(inserted)


async def order_for_key(conn: DbConn, key: str) -> asyncpg.Record | None:
    """The order an idempotency key created, with the request's fingerprint."""
    return await conn.fetchrow(
        "SELECT id, request_hash FROM orders WHERE idempotency_key = $1", key
    )


async def get_order(conn: DbConn, order_id: uuid.UUID) -> asyncpg.Record | None:
    """One order's header row, or None."""
    return await conn.fetchrow(f"SELECT {_ORDER_COLUMNS} FROM orders WHERE id = $1", order_id)


# An order with its lines and its saga's step log (the saga tables live in this database
# too) as JSON columns: one round trip for what the API shows.
_FULL_ORDER = (
    f"SELECT {_ORDER_COLUMNS},"
    " (SELECT coalesce(json_agg(json_build_object('sku', i.sku, 'quantity', i.quantity,"
    "     'unit_price', i.unit_price::text, 'quoted_price', i.quoted_price::text)"
    "     ORDER BY i.sku), '[]')"
    "   FROM order_items i WHERE i.order_id = o.id)::text AS items,"
    " (SELECT coalesce(json_agg(json_build_object('step', s.step, 'direction', s.direction,"
    "     'status', s.status, 'attempts', s.attempts, 'last_error', s.last_error,"
    "     'started_at', s.started_at, 'finished_at', s.finished_at)"
    "     ORDER BY s.started_at, s.direction DESC), '[]')"
    "   FROM saga_steps s WHERE s.saga_id = o.id)::text AS steps"
    " FROM orders o"
)


async def get_full_order(conn: DbConn, order_id: uuid.UUID) -> asyncpg.Record | None:
    """One order with ``items`` and ``steps`` (JSON text), or None."""
    return await conn.fetchrow(f"{_FULL_ORDER} WHERE o.id = $1", order_id)


async def list_orders(
    conn: DbConn,
    *,
    status: str | None,
    customer_id: str | None,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Newest first, filtered, with ``items`` and ``steps`` as in :func:`get_full_order`;
    ``after`` is the (created_at, id) of the previous page's end."""
    # Only the filters given, not "($1 IS NULL OR status = $1)": a generic plan of that
    # (asyncpg keeps one per statement) cannot use an index and scans the table.
    conditions: list[str] = []
    args: list[Any] = []
    if status is not None:
        args.append(status)
        conditions.append(f"status = ${len(args)}")
    if customer_id is not None:
        args.append(customer_id)
        conditions.append(f"customer_id = ${len(args)}")
    if after is not None:
        args.extend(after)
        conditions.append(f"(created_at, id) < (${len(args) - 1}, ${len(args)})")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    args.append(limit)
    return await conn.fetch(
        f"{_FULL_ORDER}{where} ORDER BY created_at DESC, id DESC LIMIT ${len(args)}", *args
    )


@dataclass(frozen=True)
class OrderEnd:
    """The order takes its saga's outcome (status, total, reason, the unit prices taken) and
    tells the others (``order.<status>``): CTEs of the statement that ends the saga."""

    order_id: uuid.UUID
    status: str
    total: Decimal | None
    reason: str | None
    prices: Mapping[str, Decimal]
    event_id: uuid.UUID = field(default_factory=uuid.uuid4)

    def ctes(self, after: str, first: int) -> tuple[str, list[Any]]:
        """The order's header, its lines' prices and the event, when ``after`` has a row."""
        n = first
        sql = (
            f"header AS (UPDATE orders o SET status = ${n}, total = COALESCE(${n + 1}, o.total),"
            f"   failure_reason = ${n + 2}, updated_at = now() FROM {after} f WHERE o.id = f.id"
            "   RETURNING o.id),"
            " priced AS (UPDATE order_items i SET unit_price = p.price FROM header h,"
            f"   unnest(${n + 3}::text[], ${n + 4}::numeric[]) AS p(sku, price)"
            "   WHERE i.order_id = h.id AND i.sku = p.sku),"
        )
        payload = {"order_id": str(self.order_id), "reason": self.reason}
        event_sql, event_args = event_ctes(
            self.event_id, "order", str(self.order_id), self.status, payload,
            after="header", first=n + 5,
        )  # fmt: skip
        reason = self.reason if self.status != "completed" else None
        values = [self.status, self.total, reason, list(self.prices), list(self.prices.values())]
        return f"{sql} {event_sql}", [*values, *event_args]

    @property
    def select(self) -> str:
        """Selecting the NOTIFY makes it run."""
        return "(SELECT count(*) FROM woken)"


async def reopen_order(conn: DbConn, order_id: uuid.UUID) -> None:
    """A parked order goes back to pending while its compensation is retried."""
    await conn.execute(
        "UPDATE orders SET status = 'pending', updated_at = now() WHERE id = $1", order_id
    )
