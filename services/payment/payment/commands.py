"""Payment's commands: load, decide (in the domain), save; each one idempotent by key.

>>> await run_command(db, key, fingerprint(request, body), ChargeCustomer(body))
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from ordermesh_shared.commands import Answer, Decision, Loaded, Recorded
from ordermesh_shared.database import DbConn
from ordermesh_shared.errors import NotFound

from payment import store
from payment.domain import Account, Payment
from payment.models import ChargeRequest, declined_json
from payment.models import Payment as PaymentAnswer

ChargeState = tuple[Payment | None, Account | None]
DECLINED = 422


def _answer(status: int, payment: Payment) -> Answer:
    """A declined payment is answered as a refusal that shows it; any other as itself."""
    if payment.status == "declined":
        return Answer(DECLINED, declined_json(payment))
    return Answer(status, PaymentAnswer.json_of(payment))


def _changed(status: int, payment: Payment) -> Decision[Payment]:
    """Answer with the new state, save it, and tell the others (the event carries the
    payment, also when the answer is a decline)."""
    return Decision(
        _answer(status, payment), payment, payment.event(PaymentAnswer.json_of(payment))
    )


@dataclass(frozen=True)
class ChargeCustomer:
    """Charge once per order; a decline is recorded (and answered 422) like a charge."""

    request: ChargeRequest

    async def load(self, conn: DbConn, key: str) -> Loaded[ChargeState]:
        request = self.request
        return await store.load_for_charge(conn, key, request.order_id, request.customer_id)

    def decide(self, state: ChargeState) -> Decision[Payment]:
        existing, account = state
        if existing is not None:  # made under another key: answered, or refused if undone
            existing.charge_again()
            return Decision(_answer(200, existing))
        request = self.request
        payment = Payment.charge(
            request.order_id, request.amount, customer_id=request.customer_id, account=account
        )
        return _changed(201, payment)

    async def save(self, conn: DbConn, change: Payment, recorded: Recorded) -> None:
        if change.status == "charged":
            await store.insert_charge(conn, change, recorded)
        else:  # declined: recorded, no money moves
            await store.insert_payment(conn, change, recorded)


@dataclass(frozen=True)
class RefundCustomer:
    """Undo an order's charge (a compensation); first of all, leave a 'voided' marker."""

    order_id: uuid.UUID

    async def load(self, conn: DbConn, key: str) -> Loaded[Payment | None]:
        return await store.load_for_command(conn, key, self.order_id)

    def decide(self, state: Payment | None) -> Decision[Payment]:
        if state is None:  # the refund came first: the marker refuses the late charge
            marker = Payment.voided_before_charge(self.order_id)
            return Decision(Answer(200, PaymentAnswer.json_of(marker)), marker)
        refunded = state.refund()
        if refunded is None:  # refunded, voided or declined: answered as it is
            return Decision(Answer(200, PaymentAnswer.json_of(state)))
        return _changed(200, refunded)

    async def save(self, conn: DbConn, change: Payment, recorded: Recorded) -> None:
        if change.status == "refunded":
            await store.refund_charge(conn, change, recorded)
        else:  # the marker: a new row that moves no money
            await store.insert_payment(conn, change, recorded)


async def load_payment(conn: DbConn, order_id: uuid.UUID) -> Payment:
    """The payment of an order; NotFound when it has none."""
    payment = await store.get_payment(conn, order_id)
    if payment is None:
        raise NotFound(f"no payment for order {order_id}")
    return payment
