"""``GET /catalogue``: the catalogue replica, public, with how stale it may be."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from fastapi import APIRouter, Path
from ordermesh_shared.bootstrap import Ctx
from ordermesh_shared.errors import NotFound
from pydantic import BaseModel, Field

from order import catalogue_store

catalogue_router = APIRouter(tags=["catalogue"])

Sku = Path(max_length=64, examples=["KB-101"], description="Product SKU.")


class CatalogueProduct(BaseModel):
    """A product as the replica last heard of it from inventory."""

    sku: str = Field(examples=["KB-101"])
    name: str = Field(examples=["Mechanical keyboard"])
    price: Decimal = Field(
        examples=["89.00"],
        description="What POST /orders quotes; the reservation at inventory may take another.",
    )
    available: int = Field(
        description="A hint: units inventory had available at this version; it decides when"
        " the order's stock is reserved."
    )
    version: int = Field(description="Inventory's version of these facts.")
    changed_at: datetime | None = Field(
        description="When inventory made this version (null: known from the snapshot)."
    )


class Staleness(BaseModel):
    """How fresh the replica is. Reads are answered whatever inventory's state (available
    during a partition); these fields say how old what they show may be."""

    filled: bool = Field(
        description="A snapshot from inventory has been applied. Until then the replica is"
        " cold: it may be empty or partial, and POST /orders lets unknown SKUs through for"
        " inventory to decide."
    )
    snapshot_at: datetime | None = Field(description="Inventory's time of the last snapshot.")
    last_event_at: datetime | None = Field(
        description="Inventory's time of the newest product_changed event applied."
    )
    lag_seconds: float | None = Field(
        description="now - last_event_at (null before any event). Grows while inventory is"
        " away or cut off, and also while nothing changes there: an upper bound of how far"
        " behind the replica is, not a measure of how wrong. Across hosts, clock skew adds in."
    )
    now: datetime = Field(description="The replica's clock when this was read.")


class Catalogue(BaseModel):
    """Every product the replica knows, by SKU, and its staleness."""

    products: list[CatalogueProduct]
    staleness: Staleness


class CatalogueEntry(BaseModel):
    """One product the replica knows, and its staleness."""

    product: CatalogueProduct
    staleness: Staleness


@catalogue_router.get(
    "/catalogue", summary="List the products, as the replica of inventory's catalogue has them."
)
async def list_catalogue(ctx: Ctx) -> Catalogue:
    """Eventually consistent: prices and availability may trail inventory's by
    ``staleness.lag_seconds`` or more; answered from order's own database."""
    async with ctx.db.pool.acquire() as conn:
        row = await catalogue_store.read_catalogue(conn)
    return Catalogue(products=_products(row), staleness=_staleness(row))


@catalogue_router.get(
    "/catalogue/{sku}",
    summary="Show one product, as the replica has it.",
    responses={404: {"description": "The replica knows no product with this SKU (yet)."}},
)
async def get_catalogue_entry(ctx: Ctx, sku: str = Sku) -> CatalogueEntry:
    """Eventually consistent, as ``GET /catalogue``."""
    async with ctx.db.pool.acquire() as conn:
        row = await catalogue_store.read_catalogue(conn, sku)
    products, staleness = _products(row), _staleness(row)
    if not products:
        cold = "" if staleness.filled else " (the replica is not filled from inventory yet)"
        raise NotFound(f"no product with SKU {sku!r} in the catalogue{cold}")
    return CatalogueEntry(product=products[0], staleness=staleness)


def _products(row: Any) -> list[CatalogueProduct]:
    return [CatalogueProduct(**p) for p in orjson.loads(row["products"])]


def _staleness(row: Any) -> Staleness:
    last, now = row["last_event_at"], row["now"]
    return Staleness(
        filled=row["snapshot_at"] is not None,
        snapshot_at=row["snapshot_at"],
        last_event_at=last,
        lag_seconds=round((now - last).total_seconds(), 3) if last is not None else None,
        now=now,
    )
