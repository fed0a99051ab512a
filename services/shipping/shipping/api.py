"""Shipping's HTTP API."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from ordermesh_shared.auth import SERVICE_AUTH_RESPONSES
from ordermesh_shared.bootstrap import Ctx
from ordermesh_shared.commands import fingerprint, run_command
from ordermesh_shared.errors import NotFound
from ordermesh_shared.idempotency import IdempotencyKey
from ordermesh_shared.logging import order_bound
from pydantic import BaseModel, Field

from shipping import commands, store
from shipping.models import Shipment, ShipRequest

router = APIRouter(tags=["shipping"])


class Destination(BaseModel):
    """A country (ISO 3166-1 alpha-2) and whether we ship there."""

    code: str = Field(examples=["DE"])
    name: str = Field(examples=["Germany"])
    supported: bool


@router.get("/destinations", summary="List destinations; orders to unsupported ones are cancelled.")
async def list_destinations(ctx: Ctx) -> list[Destination]:
    async with ctx.db.pool.acquire() as conn:
        rows = await store.list_destinations(conn)
    return [Destination(**dict(r)) for r in rows]


@router.post(
    "/shipments",
    summary="Create the shipment of an order; idempotent by key.",
    status_code=201,
    response_model=Shipment,
    responses={
        200: {
            "description": "The order has a shipment already (made under another key): that one.",
            "model": Shipment,
        },
        **SERVICE_AUTH_RESPONSES,
        409: {"description": "The order's shipment was cancelled: a late create."},
        422: {"description": "Invalid request or unsupported destination."},
    },
)
async def create(
    body: ShipRequest, ctx: Ctx, key: IdempotencyKey, request: Request
) -> JSONResponse:
    command = commands.CreateShipment(body)
    with order_bound(body.order_id):
        return await run_command(ctx.db, key, fingerprint(request, body), command)


@router.post(
    "/shipments/by-order/{order_id}/cancel",
    summary="Cancel the shipment of an order (compensation); idempotent by key.",
    response_model=Shipment,
    responses=SERVICE_AUTH_RESPONSES,
)
async def cancel(
    order_id: uuid.UUID, ctx: Ctx, key: IdempotencyKey, request: Request
) -> JSONResponse:
    command = commands.CancelShipment(order_id)
    with order_bound(order_id):
        return await run_command(ctx.db, key, fingerprint(request), command)


@router.get(
    "/shipments",
    summary="Find the shipment of an order.",
    responses={404: {"description": "No shipment for this order."}},
)
async def find_shipment(ctx: Ctx, order_id: Annotated[uuid.UUID, Query()]) -> Shipment:
    async with ctx.db.pool.acquire() as conn:
        return Shipment.of(await commands.load_shipment(conn, order_id))


@router.get(
    "/shipments/{shipment_id}",
    summary="Show one shipment.",
    responses={404: {"description": "No shipment has this id."}},
)
async def get_shipment(ctx: Ctx, shipment_id: uuid.UUID) -> Shipment:
    async with ctx.db.pool.acquire() as conn:
        shipment = await store.get_shipment(conn, shipment_id)
    if shipment is None:
        raise NotFound(f"no shipment with id {shipment_id}")
    return Shipment.of(shipment)
