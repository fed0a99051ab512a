"""Payment's domain: what an order paid, and the rules for charging and refunding it.

Plain Python, no I/O: each rule is a method that returns the new state (or None when nothing
changes) or raises ``Rejected`` / ``Conflict``; the commands load, decide here, and save.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Literal

from ordermesh_shared.commands import Event
from ordermesh_shared.errors import Conflict, Rejected

PaymentStatus = Literal["charged", "refunded", "declined", "voided"]
# The event each status is entered with (a refund before any charge enters none).
EVENT_OF = {"charged": "charged", "refunded": "refunded", "declined": "declined"}
# Money has cents: an amount is kept as the database stores it (numeric(12, 2)).
CENTS = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class Account:
    """What a charge may take from one customer: the balance."""

    customer_id: str
    balance: Decimal


@dataclass(frozen=True, slots=True)
class Payment:
    """The payment of one order: charged, then maybe refunded; declined when the balance was
    short; voided when a refund came before any charge (a late charge is then refused)."""

    id: uuid.UUID
    order_id: uuid.UUID
    customer_id: str | None
    amount: Decimal
    status: PaymentStatus
    reason: str | None = None

    @classmethod
    def charge(
        cls, order_id: uuid.UUID, amount: Decimal, *, customer_id: str, account: Account | None
    ) -> Payment:
        """Charge the customer's balance, or record a decline when it does not cover the
        amount (a decline is a payment too: the order cannot be charged again). An unknown
        customer is refused, and nothing is recorded."""
        if account is None:
            raise Rejected(f"unknown customer {customer_id!r}", reason="unknown_customer")
        amount = amount.quantize(CENTS)
        if account.balance < amount:
            return cls(
                uuid.uuid4(), order_id, customer_id, amount, "declined", "insufficient_funds"
            )
        return cls(uuid.uuid4(), order_id, customer_id, amount, "charged")

    @classmethod
    def voided_before_charge(cls, order_id: uuid.UUID) -> Payment:
        """The marker a refund leaves when it arrives before its charge (the saga undid a
        charge whose answer was lost): the late charge is then refused, not kept."""
        return cls(uuid.uuid4(), order_id, None, Decimal("0.00"), "voided")

    def charge_again(self) -> None:
        """A charge for an order that has a payment already: the caller gets that payment,
        unless it was refunded or voided; then the late charge is refused."""
        if self.status in ("voided", "refunded"):
            raise Conflict(
                f"the payment for this order was already {self.status}; a late charge is refused",
                reason=self.status,
            )

    def refund(self) -> Payment | None:
        """Give a charge back; None when there is nothing to give (refunded, voided or
        declined: the payment stays as it is)."""
        return replace(self, status="refunded") if self.status == "charged" else None

    def event(self, payload: Mapping[str, object]) -> Event:
        """The event this payment's status was entered with."""
        return Event("payment", str(self.order_id), EVENT_OF[self.status], payload)
