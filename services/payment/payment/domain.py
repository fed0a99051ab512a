"""Payment's command models (no I/O)."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PaymentStatus = Literal["charged", "refunded", "declined", "voided"]


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
