"""The order service's commands: place an order, take its saga's outcome, retry a parked one.

Each loads what it needs, decides (the rules are in :mod:`order.domain`) and saves in one
statement where it can; the routes in :mod:`order.api` only translate HTTP.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg
from fastapi.responses import JSONResponse
from ordermesh_shared.errors import (
    RETRY_AFTER_SECONDS,
    Conflict,
    NotFound,
    Rejected,
    ServiceError,
)
from ordermesh_shared.saga import SagaOutcome
from ordermesh_shared.saga.store import SagaRow

from order import store
from order.app_state import OrderRuntime
from order.domain import PlaceOrder, PlaceOrderRequest, Reserved, order_status, replayed


class Overloaded(ServiceError):
    """Too many sagas in flight here: shed, don't queue (429 with ``Retry-After``)."""

    status_code = 429

    def response(self) -> JSONResponse:
        """The 429 answer (the shared handler sets no headers)."""
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return JSONResponse(self.body(), status_code=self.status_code, headers=headers)


@dataclass(frozen=True, slots=True)
class Placed:
    """The order a POST names: new (with its saga, to launch) or created earlier by its key."""

    order_id: uuid.UUID
    saga: SagaRow | None  # None: a replay, nothing to launch


async def place(
    runtime: OrderRuntime,
    pool: asyncpg.Pool,
    request: PlaceOrderRequest,
    *,
    key: str | None,
    fingerprint: str,
) -> Placed:
    """The new order, quoted from the catalogue replica, and its saga, written in one
    statement, or the order this key created earlier; :class:`Overloaded` when this instance
    may start no saga, ``Rejected`` for a SKU the (filled) replica does not know, unless it is
    a replay."""
    if runtime.admission.full:
        return Placed(await _earlier(pool, key, fingerprint, refusal=_overloaded(runtime)), None)
    order_id = uuid.uuid4()
    order = PlaceOrder.from_request(order_id, request)
    try:
        quoted = runtime.catalogue.quote(order.lines)  # this instance's copy: no round trip
    except Rejected as refusal:
        return Placed(await _earlier(pool, key, fingerprint, refusal=refusal), None)
    saga = runtime.engine.prepare(runtime.definition, order_id, order)
    with runtime.admission.creating():
        async with pool.acquire() as conn:
            if await store.place_order(
                conn,
                order_id,
                request,
                quoted,
                idempotency_key=key,
                request_hash=fingerprint,
                saga=saga,
            ):
                return Placed(order_id, saga.row)
            existing = await store.order_for_key(conn, key or "")
    assert existing is not None  # the key conflicted: its order is committed
    return Placed(replayed(existing["id"], existing["request_hash"], fingerprint, key), None)


async def _earlier(
    pool: asyncpg.Pool, key: str | None, fingerprint: str, *, refusal: ServiceError
) -> uuid.UUID:
    """The order this key created earlier (a replay creates nothing, so it is neither shed nor
    checked against today's catalogue), else ``refusal``."""
    if key is not None:
        async with pool.acquire() as conn:
            existing = await store.order_for_key(conn, key)
        if existing is not None:
            return replayed(existing["id"], existing["request_hash"], fingerprint, key)
    raise refusal


def _overloaded(runtime: OrderRuntime) -> Overloaded:
    return Overloaded(
        f"this order instance is running its limit of {runtime.admission.limit} sagas; nothing"
        " was created, retry after Retry-After",
        reason="overloaded",
    )


def finish(outcome: SagaOutcome) -> store.OrderEnd:
    """The order takes its saga's outcome, written in the statement that ends the saga."""
    reserved = outcome.results.find(Reserved)  # None when stock was never reserved
    return store.OrderEnd(
        outcome.saga_id,
        order_status(outcome.status),
        total=reserved.total if reserved else None,
        reason=outcome.reason,
        prices=reserved.prices if reserved else {},
    )


async def retry(runtime: OrderRuntime, pool: asyncpg.Pool, order_id: uuid.UUID) -> None:
    """Put a parked order's saga back to compensating (launch it after)."""
    async with pool.acquire() as conn, conn.transaction():
        if await store.get_order(conn, order_id) is None:
            raise NotFound(f"no order with id {order_id}")
        if not await runtime.engine.reopen(conn, order_id):
            raise Conflict("only a compensation_failed order can be retried")
        await store.reopen_order(conn, order_id)
    runtime.engine.launch(order_id)
