"""The public order API."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Literal

from fastapi import APIRouter
from ordermesh_shared.bootstrap import Ctx
from ordermesh_shared.errors import NotFound
from pydantic import BaseModel, Field

from order import store

router = APIRouter(tags=["orders"])

OrderStatus = Literal["pending", "completed", "cancelled", "compensation_failed"]


class OrderItem(BaseModel):
    """One line of an order."""

    sku: str = Field(examples=["KB-101"])
    quantity: int = Field(examples=[2])
    unit_price: Decimal | None = Field(None, description="Known once stock is reserved.")


class Order(BaseModel):
    """An order and where its saga stands."""

    id: uuid.UUID
    customer_id: str = Field(examples=["alice"])
    destination: str = Field(examples=["DE"])
    status: OrderStatus
    total: Decimal | None = Field(None, examples=["178.00"])
    failure_reason: str | None = None
    items: list[OrderItem]
    created_at: datetime
    updated_at: datetime


@router.get(
    "/orders/{order_id}",
    summary="Show one order: status, total, failure reason.",
    responses={404: {"description": "No order has this id."}},
)
async def get_order(ctx: Ctx, order_id: uuid.UUID) -> Order:
    async with ctx.db.pool.acquire() as conn:
        row = await store.get_order(conn, order_id)
        if row is None:
            raise NotFound(f"no order with id {order_id}")
        items = await store.get_order_items(conn, order_id)
    return Order(**dict(row), items=[OrderItem(**dict(i)) for i in items])
