"""Payment's HTTP models: what requests carry and answers show (pydantic, at the edge)."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from payment import domain
from payment.domain import PaymentStatus


class ChargeRequest(BaseModel):
    """Charge a customer for an order."""

    model_config = ConfigDict(extra="forbid")

    order_id: uuid.UUID
    customer_id: str = Field(min_length=1, max_length=64, examples=["alice"])
    amount: Decimal = Field(gt=0, le=Decimal("1000000"), decimal_places=2, examples=["178.00"])


class Payment(BaseModel):
    """The payment of one order: charged, refunded, declined, or voided (refunded before any
    charge arrived, so a late charge is refused)."""

    id: uuid.UUID
    order_id: uuid.UUID
    customer_id: str | None
    amount: Decimal
    status: PaymentStatus
    reason: str | None = None

    @classmethod
    def of(cls, payment: domain.Payment) -> Payment:
        """The answer for a payment."""
        return cls(
            id=payment.id,
            order_id=payment.order_id,
            customer_id=payment.customer_id,
            amount=payment.amount,
            status=payment.status,
            reason=payment.reason,
        )

    @classmethod
    def json_of(cls, payment: domain.Payment) -> dict[str, Any]:
        """The answer's JSON body (as stored with the command's key, and as its event)."""
        return cls.of(payment).model_dump(mode="json")


def declined_json(payment: domain.Payment) -> dict[str, Any]:
    """The 422 body of a declined charge: shaped like every other business rejection, with
    the recorded payment alongside."""
    return {
        "detail": f"insufficient funds for a charge of {payment.amount}",
        "reason": "insufficient_funds",
        "payment": Payment.json_of(payment),
    }


class Customer(BaseModel):
    """A customer account; the balance only for the platform's services and admins."""

    id: str = Field(examples=["alice"])
    name: str = Field(examples=["Alice Martin"])
    balance: Decimal | None = Field(
        None,
        examples=["100000.00"],
        description=(
            "What the customer can spend; shown only with a service token or X-Admin-Token."
        ),
    )
