"""Inventory's HTTP API."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from ordermesh_shared.admin import ADMIN_RESPONSES, RequireAdmin
from ordermesh_shared.auth import SERVICE_AUTH_RESPONSES, ServiceCaller
from ordermesh_shared.bootstrap import Ctx
from ordermesh_shared.commands import fingerprint, run_command
from ordermesh_shared.errors import NotFound
from ordermesh_shared.idempotency import IdempotencyKey
from ordermesh_shared.logging import order_bound
from pydantic import BaseModel, ConfigDict, Field

from inventory import commands, store
from inventory.models import Reservation, ReserveRequest

router = APIRouter()

Sku = Path(max_length=64, examples=["KB-101"], description="Product SKU.")
COMMAND_ERRORS: dict[int | str, dict[str, Any]] = {
    **SERVICE_AUTH_RESPONSES,
    409: {"description": "Refused by the reservation's state (e.g. released before reserve)."},
    422: {"description": "Invalid request, unknown SKU or insufficient stock (`reason` says)."},
}


class Product(BaseModel):
    """A product and its stock buckets (available + reserved + committed is conserved)."""

    sku: str = Field(examples=["KB-101"])
    name: str = Field(examples=["Mechanical keyboard"])
    price: Decimal = Field(examples=["89.00"])
    available: int = Field(description="Units that can be reserved now.")
    reserved: int = Field(description="Units held for pending orders.")
    committed: int = Field(description="Units sold to completed orders.")
    stocked: int = Field(description="Units ever stocked: available + reserved + committed.")


@router.get("/products", tags=["products"], summary="List every product with its stock.")
async def list_products(ctx: Ctx) -> list[Product]:
    async with ctx.db.pool.acquire() as conn:
        rows = await store.list_products(conn)
    return [Product(**dict(r)) for r in rows]


@router.get(
    "/products/{sku}",
    tags=["products"],
    summary="Show one product.",
    responses={404: {"description": "No product has this SKU."}},
)
async def get_product(ctx: Ctx, sku: str = Sku) -> Product:
    async with ctx.db.pool.acquire() as conn:
        row = await store.get_product(conn, sku)
    if row is None:
        raise NotFound(f"no product with SKU {sku!r}")
    return Product(**dict(row))


class PriceChange(BaseModel):
    """A product's new price."""

    model_config = ConfigDict(extra="forbid")

    price: Decimal = Field(ge=0, max_digits=12, decimal_places=2, examples=["95.00"])


@router.put(
    "/products/{sku}/price",
    tags=["products"],
    summary="Admin: set a product's price (announced to catalogues as product_changed).",
    dependencies=[RequireAdmin],
    responses={**ADMIN_RESPONSES, 404: {"description": "No product has this SKU."}},
)
async def set_price(body: PriceChange, ctx: Ctx, sku: str = Sku) -> Product:
    """Setting the price a product already has changes nothing and announces nothing; a
    reservation racing the change is taken again at the new price."""
    async with ctx.db.pool.acquire() as conn:
        row = await store.set_price(conn, sku, body.price)
    if row is None:
        raise NotFound(f"no product with SKU {sku!r}")
    return Product(**{k: v for k, v in dict(row).items() if k != "notified"})


class CatalogueFact(BaseModel):
    """What a catalogue shows of a product, at one version."""

    sku: str = Field(examples=["KB-101"])
    name: str = Field(examples=["Mechanical keyboard"])
    price: Decimal = Field(examples=["89.00"])
    available: int = Field(description="Units that could be reserved at this version.")
    version: int = Field(
        description="Grows with every change of price or units available; the product_changed"
        " event of a change carries the same facts and version."
    )


class CatalogueSnapshot(BaseModel):
    """Every product's catalogue facts, read in one consistent view."""

    taken_at: datetime = Field(description="When inventory read them (its clock).")
    products: list[CatalogueFact]


@router.get(
    "/catalogue/snapshot",
    tags=["catalogue"],
    summary="Internal: every product's catalogue facts and version, for a cold replica.",
    responses=SERVICE_AUTH_RESPONSES,
)
async def catalogue_snapshot(ctx: Ctx, caller: ServiceCaller) -> CatalogueSnapshot:
    """A replica subscribed to product_changed before reading this loses nothing: changes
    committed before the read are in it, later ones come as events with higher versions."""
    async with ctx.db.pool.acquire() as conn:
        row = await store.catalogue_snapshot(conn)
    products = [CatalogueFact(**p) for p in orjson.loads(row["products"])]
    return CatalogueSnapshot(taken_at=row["taken_at"], products=products)


@router.post(
    "/reservations",
    tags=["reservations"],
    summary="Reserve stock for an order (all lines or none); idempotent by key.",
    status_code=201,
    response_model=Reservation,
    responses={
        200: {
            "description": "The order holds a reservation already (made under another key).",
            "model": Reservation,
        },
        **COMMAND_ERRORS,
    },
)
async def reserve(
    body: ReserveRequest, ctx: Ctx, key: IdempotencyKey, request: Request
) -> JSONResponse:
    command = commands.ReserveStock(body)
    with order_bound(body.order_id):
        return await run_command(ctx.db, key, fingerprint(request, body), command)


@router.post(
    "/reservations/{order_id}/release",
    tags=["reservations"],
    summary="Release an order's reservation (compensation); idempotent by key.",
    response_model=Reservation,
    responses=COMMAND_ERRORS,
)
async def release(
    order_id: uuid.UUID, ctx: Ctx, key: IdempotencyKey, request: Request
) -> JSONResponse:
    command = commands.ReleaseStock(order_id)
    with order_bound(order_id):
        return await run_command(ctx.db, key, fingerprint(request), command)


@router.post(
    "/reservations/{order_id}/commit",
    tags=["reservations"],
    summary="Commit an order's reservation: the units are sold; idempotent by key.",
    response_model=Reservation,
    responses={**COMMAND_ERRORS, 404: {"description": "No reservation for this order."}},
)
async def commit(
    order_id: uuid.UUID, ctx: Ctx, key: IdempotencyKey, request: Request
) -> JSONResponse:
    command = commands.CommitStock(order_id)
    with order_bound(order_id):
        return await run_command(ctx.db, key, fingerprint(request), command)


@router.get(
    "/reservations/{order_id}",
    tags=["reservations"],
    summary="Show the reservation of an order.",
    responses={404: {"description": "No reservation for this order."}},
)
async def get_reservation(order_id: uuid.UUID, ctx: Ctx) -> Reservation:
    async with ctx.db.pool.acquire() as conn:
        return Reservation.of(await commands.load_reservation(conn, order_id))
