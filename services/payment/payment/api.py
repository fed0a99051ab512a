"""Payment's HTTP API."""

from __future__ import annotations

import uuid
from typing import Annotated

import asyncpg
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse
from ordermesh_shared.admin import IsAdmin
from ordermesh_shared.auth import SERVICE_AUTH_RESPONSES, MaybeServiceCaller
from ordermesh_shared.bootstrap import Ctx
from ordermesh_shared.commands import fingerprint, run_command
from ordermesh_shared.errors import NotFound
from ordermesh_shared.idempotency import IdempotencyKey
from ordermesh_shared.logging import order_bound

from payment import commands, store
from payment.models import ChargeRequest, Customer, Payment

router = APIRouter(tags=["customers"])

CustomerId = Path(max_length=64, examples=["alice"], description="Customer id.")


async def sees_balances(caller: MaybeServiceCaller, admin: IsAdmin) -> bool:
    """FastAPI dependency: balances are private (anonymous callers see ids and names only)."""
    return caller is not None or admin


SeesBalances = Annotated[bool, Depends(sees_balances)]


def _customer(row: asyncpg.Record, *, with_balance: bool) -> Customer:
    customer = Customer(**dict(row))
    return customer if with_balance else customer.model_copy(update={"balance": None})


@router.get(
    "/customers",
    summary="List every customer account (balances only for services and admins).",
    response_model_exclude_none=True,
)
async def list_customers(ctx: Ctx, private: SeesBalances) -> list[Customer]:
    async with ctx.db.pool.acquire() as conn:
        rows = await store.list_customers(conn)
    return [_customer(r, with_balance=private) for r in rows]


@router.get(
    "/customers/{customer_id}",
    summary="Show one customer account (its balance only for services and admins).",
    responses={404: {"description": "No customer has this id."}},
    response_model_exclude_none=True,
)
async def get_customer(ctx: Ctx, private: SeesBalances, customer_id: str = CustomerId) -> Customer:
    async with ctx.db.pool.acquire() as conn:
        row = await store.get_customer(conn, customer_id)
    if row is None:
        raise NotFound(f"no customer with id {customer_id!r}")
    return _customer(row, with_balance=private)


@router.post(
    "/payments",
    tags=["payments"],
    summary="Charge a customer for an order; idempotent by key.",
    status_code=201,
    response_model=Payment,
    responses={
        200: {
            "description": "The order was charged already (under another key): that payment.",
            "model": Payment,
        },
        **SERVICE_AUTH_RESPONSES,
        409: {"description": "The order's payment was refunded or voided: a late charge."},
        422: {"description": "Invalid request, unknown customer or insufficient funds."},
    },
)
async def charge(
    body: ChargeRequest, ctx: Ctx, key: IdempotencyKey, request: Request
) -> JSONResponse:
    command = commands.ChargeCustomer(body)
    with order_bound(body.order_id):
        return await run_command(ctx.db, key, fingerprint(request, body), command)


@router.post(
    "/payments/{order_id}/refund",
    tags=["payments"],
    summary="Refund an order's charge (compensation); idempotent by key.",
    response_model=Payment,
    responses=SERVICE_AUTH_RESPONSES,
)
async def refund(
    order_id: uuid.UUID, ctx: Ctx, key: IdempotencyKey, request: Request
) -> JSONResponse:
    command = commands.RefundCustomer(order_id)
    with order_bound(order_id):
        return await run_command(ctx.db, key, fingerprint(request), command)


@router.get(
    "/payments/{order_id}",
    tags=["payments"],
    summary="Show the payment of an order.",
    responses={404: {"description": "No payment for this order."}},
)
async def get_payment(order_id: uuid.UUID, ctx: Ctx) -> Payment:
    async with ctx.db.pool.acquire() as conn:
        return Payment.of(await commands.load_payment(conn, order_id))
