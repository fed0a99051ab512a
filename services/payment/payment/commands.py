"""Charge and refund: each runs inside the idempotent command's transaction."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from ordermesh_shared.database import DbConn
from ordermesh_shared.errors import Conflict, NotFound, Rejected
from ordermesh_shared.outbox import add_event

from payment import store
from payment.domain import ChargeRequest, Payment

DECLINED = 422


async def charge_customer(conn: DbConn, request: ChargeRequest) -> tuple[int, Any]:
    """Charge once per order; a decline is recorded (and answered 422) like a charge."""
    existing = await store.lock_payment(conn, request.order_id)
    if existing is not None:
        payment = await _refuse_if_voided(conn, request.order_id)
        return (DECLINED, _declined(payment)) if payment.status == "declined" else (200, payment)
    if await store.debit(conn, request.customer_id, request.amount):
        payment = await _record(conn, request, "charged")
        return 201, await _with_event(conn, payment, "charged")
    # No debit: either nobody by that name, or not enough money.
    if await store.get_customer(conn, request.customer_id) is None:
        raise Rejected(f"unknown customer {request.customer_id!r}", reason="unknown_customer")
    payment = await _record(conn, request, "declined", reason="insufficient_funds")
    return DECLINED, _declined(await _with_event(conn, payment, "declined"))


async def _with_event(conn: DbConn, payment: Payment, event_type: str) -> Payment:
    await add_event(
        conn,
        aggregate_type="payment",
        aggregate_id=str(payment.order_id),
        event_type=event_type,
        payload=payment.model_dump(mode="json"),
    )
    return payment


def _declined(payment: Payment) -> dict[str, Any]:
    # Shaped like every other business rejection, with the recorded payment alongside.
    return {
        "detail": f"insufficient funds for a charge of {payment.amount}",
        "reason": "insufficient_funds",
        "payment": payment,
    }


async def _refuse_if_voided(conn: DbConn, order_id: uuid.UUID) -> Payment:
    payment = await load_payment(conn, order_id)
    if payment.status in ("voided", "refunded"):
        raise Conflict(
            f"the payment for this order was already {payment.status}; a late charge is refused",
            reason=payment.status,
        )
    return payment


async def _record(
    conn: DbConn, request: ChargeRequest, status: str, *, reason: str | None = None
) -> Payment:
    row = await store.insert_payment(
        conn,
        request.order_id,
        customer_id=request.customer_id,
        amount=request.amount,
        status=status,
        reason=reason,
    )
    return Payment(**dict(row))


async def refund_customer(conn: DbConn, order_id: uuid.UUID) -> tuple[int, Payment]:
    """Undo the order's charge; a refund before any charge leaves a 'voided' marker."""
    existing = await store.lock_payment(conn, order_id)
    if existing is None:
        await store.insert_payment(
            conn, order_id, customer_id=None, amount=Decimal("0"), status="voided"
        )
    elif existing["status"] == "charged":
        await store.credit(conn, existing["customer_id"], existing["amount"])
        refunded = Payment(**dict(await store.set_status(conn, order_id, "refunded")))
        return 200, await _with_event(conn, refunded, "refunded")
    return 200, await load_payment(conn, order_id)


async def load_payment(conn: DbConn, order_id: uuid.UUID) -> Payment:
    """The payment of an order as the API shows it."""
    row = await store.get_payment(conn, order_id)
    if row is None:
        raise NotFound(f"no payment for order {order_id}")
    return Payment(**dict(row))
