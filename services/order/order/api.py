"""The public order API."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from ordermesh_shared.admin import ADMIN_RESPONSES, RequireAdmin
from ordermesh_shared.bootstrap import Ctx
from ordermesh_shared.commands import fingerprint as fingerprint_of
from ordermesh_shared.errors import NotFound, ServiceError
from ordermesh_shared.resilience import remaining
from pydantic import BaseModel, Field

from order import commands, store
from order.app_state import order_runtime
from order.domain import TERMINAL_STATUSES, OrderStatus, PlaceOrderRequest, price_changes

router = APIRouter(tags=["orders"])


class OrderItem(BaseModel):
    """One line of an order."""

    sku: str = Field(examples=["KB-101"])
    quantity: int = Field(examples=[2])
    unit_price: Decimal | None = Field(
        None, description="The price inventory reserved at (known once stock is reserved)."
    )
    quoted_price: Decimal | None = Field(
        None,
        description="The price the catalogue replica quoted when the order was placed (null:"
        " the replica did not know the product yet).",
    )


class PriceChange(BaseModel):
    """A line that inventory reserved at another price than the quoted one."""

    sku: str = Field(examples=["KB-101"])
    quoted_price: Decimal = Field(examples=["89.00"])
    unit_price: Decimal = Field(examples=["95.00"], description="The price taken.")
    difference: Decimal = Field(examples=["6.00"], description="unit_price - quoted_price.")


class SagaStep(BaseModel):
    """One entry of the saga's step log."""

    step: str = Field(examples=["charge_payment"])
    direction: Literal["forward", "compensate"]
    status: Literal["started", "succeeded", "rejected", "failed"]
    attempts: int
    last_error: str | None
    started_at: datetime
    finished_at: datetime | None


class Order(BaseModel):
    """An order and where its saga stands."""

    id: uuid.UUID
    customer_id: str = Field(examples=["alice"])
    destination: str = Field(examples=["DE"])
    status: OrderStatus
    total: Decimal | None = Field(None, examples=["178.00"])
    failure_reason: str | None = Field(None, examples=["insufficient_funds: ..."])
    items: list[OrderItem]
    price_changes: list[PriceChange] = Field(
        description="Lines quoted at one price and reserved at another: inventory's price is"
        " the one charged (the replica is eventually consistent)."
    )
    steps: list[SagaStep] = Field(description="The saga's step history.")
    created_at: datetime
    updated_at: datetime


class OrderPage(BaseModel):
    """A page of orders, newest first."""

    orders: list[Order]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")


IdempotencyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description="Posting again with the same key returns the same order.",
    ),
]


# The 429 of POST /orders, documented like the shared 503 (conformance tests check both).
SHED_RESPONSE: dict[str, object] = {
    "description": (
        "This instance runs as many sagas as it may (MAX_IN_FLIGHT_SAGAS): nothing was"
        " created; retry after `Retry-After`. A replayed Idempotency-Key is still answered."
    ),
    "headers": {
        "Retry-After": {
            "description": "Seconds to wait before trying again.",
            "schema": {"type": "integer"},
        }
    },
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"detail": {"type": "string"}, "reason": {"type": "string"}},
                "required": ["detail"],
            }
        }
    },
}


@router.post(
    "/orders",
    summary="Place an order; 201 when it ended within the wait, else 202 with Location.",
    status_code=201,
    response_model=Order,
    responses={
        200: {"description": "A replay of an earlier Idempotency-Key: that order."},
        202: {"description": "Accepted, still running: follow `Location`."},
        422: {
            "description": "Invalid request, Idempotency-Key reused with another body, or an"
            " SKU the catalogue replica does not know (`reason` unknown_sku; checked once the"
            " replica is filled: while it is cold the order goes ahead and inventory decides)."
        },
        429: SHED_RESPONSE,
    },
)
async def place_order(
    body: PlaceOrderRequest, ctx: Ctx, request: Request, key: IdempotencyHeader = None
) -> JSONResponse:
    runtime = order_runtime(ctx)
    fingerprint = fingerprint_of(request, body)
    try:
        placed = await commands.place(runtime, ctx.db.pool, body, key=key, fingerprint=fingerprint)
    except commands.Overloaded as exc:
        runtime.admission.shed.inc()
        return exc.response()
    # No await between the end of place() and launch: the saga is counted by
    # admission.creating() until engine.in_flight counts it.
    if placed.saga is not None:
        runtime.engine.launch(placed.order_id, placed.saga)
    await runtime.engine.wait(placed.order_id, timeout=saga_wait(runtime.wait))
    order = await load_order(ctx, placed.order_id)
    return _placed(
        order,
        created=placed.saga is not None,
        location=str(request.url_for("get_order", order_id=placed.order_id)),
    )


# What the POST keeps of the caller's deadline to read the order and answer (at least).
ANSWER_MARGIN = 0.05


def saga_wait(configured: float) -> float:
    """How long the POST waits for its saga: ``configured``, cut short so that the answer
    (202 + Location if the saga still runs) beats the caller's ``X-Deadline-Ms``. The saga
    itself runs on its own budget, whatever the caller's deadline."""
    left = remaining()
    if left is None:
        return configured
    return max(0.0, min(configured, left - max(ANSWER_MARGIN, 0.2 * left)))


def _placed(order: Order, *, created: bool, location: str) -> JSONResponse:
    body = order.model_dump(mode="json")
    headers = {"Location": location}
    if order.status not in TERMINAL_STATUSES:
        return JSONResponse(body, status_code=202, headers=headers)
    return JSONResponse(body, status_code=201 if created else 200, headers=headers)


@router.get(
    "/orders/{order_id}",
    summary="Show one order: status, total, failure reason, saga steps.",
    responses={404: {"description": "No order has this id."}},
)
async def get_order(ctx: Ctx, order_id: uuid.UUID) -> Order:
    return await load_order(ctx, order_id)


async def load_order(ctx: Ctx, order_id: uuid.UUID) -> Order:
    """An order with its lines and step log."""
    async with ctx.db.pool.acquire() as conn:
        row = await store.get_full_order(conn, order_id)
    if row is None:
        raise NotFound(f"no order with id {order_id}")
    return _order(row)


def _order(row: Any) -> Order:
    fields = dict(row)
    items = [OrderItem(**i) for i in orjson.loads(fields.pop("items"))]
    steps = orjson.loads(fields.pop("steps"))
    return Order(
        **fields,
        items=items,
        price_changes=_price_changes(items),
        steps=[SagaStep(**s) for s in steps],
    )


def _price_changes(items: list[OrderItem]) -> list[PriceChange]:
    quoted = {item.sku: item.quoted_price for item in items}
    taken = {item.sku: item.unit_price for item in items}
    return [
        PriceChange(sku=c.sku, quoted_price=c.quoted, unit_price=c.taken, difference=c.difference)
        for c in price_changes(quoted, taken)
    ]


@router.get(
    "/orders",
    summary="List orders, newest first, filtered and paginated.",
    responses={422: {"description": "Bad filter, limit or cursor."}},
)
async def list_orders(
    ctx: Ctx,
    status: Annotated[OrderStatus | None, Query(description="Only orders in this status.")] = None,
    customer_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200, description="From `next_cursor`.")] = None,
) -> OrderPage:
    after = _decode_cursor(cursor) if cursor else None
    async with ctx.db.pool.acquire() as conn:
        rows = await store.list_orders(
            conn, status=status, customer_id=customer_id, after=after, limit=limit
        )
    orders = [_order(r) for r in rows]
    more = len(rows) == limit
    return OrderPage(orders=orders, next_cursor=_encode_cursor(rows[-1]) if more else None)


def _encode_cursor(row: Any) -> str:
    raw = f"{row['created_at'].isoformat()}|{row['id']}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, _, order_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(created), uuid.UUID(order_id)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor("cursor is not one this API returned; start again without it") from None


class InvalidCursor(ServiceError):
    """The cursor does not decode (422)."""

    status_code = 422


@router.post(
    "/orders/{order_id}/retry",
    summary="Admin: retry the compensation of a parked (compensation_failed) order.",
    status_code=202,
    dependencies=[RequireAdmin],
    responses={
        **ADMIN_RESPONSES,
        404: {"description": "No order has this id."},
        409: {"description": "The order is not parked."},
    },
)
async def retry_order(ctx: Ctx, order_id: uuid.UUID) -> Order:
    await commands.retry(order_runtime(ctx), ctx.db.pool, order_id)
    return await load_order(ctx, order_id)
