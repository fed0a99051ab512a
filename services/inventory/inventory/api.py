"""Inventory's HTTP API."""

from __future__ import annotations

from decimal import Decimal

from fastapi import APIRouter, Path
from ordermesh_shared.bootstrap import Ctx
from ordermesh_shared.errors import NotFound
from pydantic import BaseModel, Field

from inventory import store

router = APIRouter(tags=["products"])

Sku = Path(max_length=64, examples=["KB-101"], description="Product SKU.")


class Product(BaseModel):
    """A product and its stock buckets (available + reserved + committed is conserved)."""

    sku: str = Field(examples=["KB-101"])
    name: str = Field(examples=["Mechanical keyboard"])
    price: Decimal = Field(examples=["89.00"])
    available: int = Field(description="Units that can be reserved now.")
    reserved: int = Field(description="Units held for pending orders.")
    committed: int = Field(description="Units sold to completed orders.")


@router.get("/products", summary="List every product with its stock.")
async def list_products(ctx: Ctx) -> list[Product]:
    async with ctx.db.pool.acquire() as conn:
        rows = await store.list_products(conn)
    return [Product(**dict(r)) for r in rows]


@router.get(
    "/products/{sku}",
    summary="Show one product.",
    responses={404: {"description": "No product has this SKU."}},
)
async def get_product(ctx: Ctx, sku: str = Sku) -> Product:
    async with ctx.db.pool.acquire() as conn:
        row = await store.get_product(conn, sku)
    if row is None:
        raise NotFound(f"no product with SKU {sku!r}")
    return Product(**dict(row))
