"""Shipping's HTTP API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from fastapi import APIRouter
from ordermesh_shared.bootstrap import Ctx
from ordermesh_shared.errors import NotFound
from pydantic import BaseModel, Field

from shipping import store

router = APIRouter(tags=["shipping"])


class Destination(BaseModel):
    """A country (ISO 3166-1 alpha-2) and whether we ship there."""

    code: str = Field(examples=["DE"])
    name: str = Field(examples=["Germany"])
    supported: bool


class Shipment(BaseModel):
    """A shipment created for an order."""

    id: uuid.UUID
    order_id: uuid.UUID
    destination: str = Field(examples=["DE"])
    status: Literal["created", "cancelled"]
    created_at: datetime
    updated_at: datetime


@router.get("/destinations", summary="List destinations; orders to unsupported ones are cancelled.")
async def list_destinations(ctx: Ctx) -> list[Destination]:
    async with ctx.db.pool.acquire() as conn:
        rows = await store.list_destinations(conn)
    return [Destination(**dict(r)) for r in rows]


@router.get(
    "/shipments/{shipment_id}",
    summary="Show one shipment.",
    responses={404: {"description": "No shipment has this id."}},
)
async def get_shipment(ctx: Ctx, shipment_id: uuid.UUID) -> Shipment:
    async with ctx.db.pool.acquire() as conn:
        row = await store.get_shipment(conn, shipment_id)
    if row is None:
        raise NotFound(f"no shipment with id {shipment_id}")
    return Shipment(**dict(row))
