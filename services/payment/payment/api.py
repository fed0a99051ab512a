"""Payment's HTTP API."""

from __future__ import annotations

from decimal import Decimal

from fastapi import APIRouter, Path
from ordermesh_shared.bootstrap import Ctx
from ordermesh_shared.errors import NotFound
from pydantic import BaseModel, Field

from payment import store

router = APIRouter(tags=["customers"])

CustomerId = Path(max_length=64, examples=["alice"], description="Customer id.")


class Customer(BaseModel):
    """A customer account."""

    id: str = Field(examples=["alice"])
    name: str = Field(examples=["Alice Martin"])
    balance: Decimal = Field(examples=["100000.00"], description="What the customer can spend.")


@router.get("/customers", summary="List every customer account.")
async def list_customers(ctx: Ctx) -> list[Customer]:
    async with ctx.db.pool.acquire() as conn:
        rows = await store.list_customers(conn)
    return [Customer(**dict(r)) for r in rows]


@router.get(
    "/customers/{customer_id}",
    summary="Show one customer account.",
    responses={404: {"description": "No customer has this id."}},
)
async def get_customer(ctx: Ctx, customer_id: str = CustomerId) -> Customer:
    async with ctx.db.pool.acquire() as conn:
        row = await store.get_customer(conn, customer_id)
    if row is None:
        raise NotFound(f"no customer with id {customer_id!r}")
    return Customer(**dict(row))
