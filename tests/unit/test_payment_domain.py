"""Payment's rules without a database: charging a balance, and what a payment may become."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from ordermesh_shared.errors import Conflict, Rejected
from payment.commands import ChargeCustomer, RefundCustomer
from payment.domain import Account, Payment
from payment.models import ChargeRequest

ORDER = uuid.uuid4()
CAROL = Account("carol", Decimal("500.00"))


def charge(amount: str, account: Account | None = CAROL) -> Payment:
    return Payment.charge(ORDER, Decimal(amount), customer_id="carol", account=account)


def test_a_covered_charge_is_charged_in_cents() -> None:
    payment = charge("120")
    assert (payment.order_id, payment.customer_id) == (ORDER, "carol")
    assert (payment.status, payment.reason) == ("charged", None)
    assert str(payment.amount) == "120.00"  # as stored and answered, whatever was sent
    assert charge("500.00").status == "charged"  # the whole balance may go


def test_a_short_balance_records_a_decline_and_an_unknown_customer_nothing() -> None:
    declined = charge("500.01")
    assert (declined.status, declined.reason, declined.amount) == (
        "declined",
        "insufficient_funds",
        Decimal("500.01"),
    )
    with pytest.raises(Rejected) as refused:
        charge("1.00", account=None)
    assert refused.value.reason == "unknown_customer"


def test_a_refund_gives_a_charge_back_once() -> None:
    refunded = charge("120.00").refund()
    assert refunded is not None
    assert (refunded.status, refunded.amount, refunded.customer_id) == (
        "refunded",
        Decimal("120.00"),
        "carol",
    )
    assert refunded.refund() is None  # again: nothing changes
    assert charge("900.00").refund() is None  # a decline took nothing: nothing to give


def test_a_refund_first_leaves_a_marker_that_refuses_the_late_charge() -> None:
    marker = Payment.voided_before_charge(ORDER)
    assert (marker.status, marker.customer_id, marker.amount) == ("voided", None, Decimal("0"))
    assert marker.refund() is None
    for undone in (marker, charge("1.00").refund()):
        assert undone is not None
        with pytest.raises(Conflict) as refused:
            undone.charge_again()
        assert refused.value.reason == undone.status
    charge("1.00").charge_again()  # a charge under another key for a charged order: fine
    charge("900.00").charge_again()  # ...or a declined one (answered as declined again)


def test_each_change_names_its_event() -> None:
    event = charge("1.00").event({"status": "charged"})
    assert (event.aggregate_type, event.aggregate_id) == ("payment", str(ORDER))
    assert event.event_type == "charged"
    assert charge("900.00").event({}).event_type == "declined"
    refunded = charge("1.00").refund()
    assert refunded is not None
    assert refunded.event({}).event_type == "refunded"


def request(amount: str) -> ChargeRequest:
    return ChargeRequest(order_id=ORDER, customer_id="carol", amount=Decimal(amount))


def test_charge_decisions_answer_as_the_api_always_did() -> None:
    charged = ChargeCustomer(request("120.00")).decide((None, CAROL))
    assert charged.change is not None
    assert charged.event is not None
    assert (charged.answer.status, charged.answer.body["amount"]) == (201, "120.00")
    assert charged.event.payload == charged.answer.body

    declined = ChargeCustomer(request("900.00")).decide((None, CAROL))
    assert declined.change is not None
    assert declined.event is not None
    assert declined.answer.status == 422
    assert declined.answer.body["reason"] == "insufficient_funds"
    assert declined.answer.body["detail"] == "insufficient funds for a charge of 900.00"
    assert declined.answer.body["payment"]["status"] == "declined"
    assert declined.event.payload == declined.answer.body["payment"]

    again = ChargeCustomer(request("1.00")).decide((declined.change, CAROL))
    assert (again.change, again.answer) == (None, declined.answer)  # the decline, unchanged


def test_refund_decisions_change_only_a_charge() -> None:
    payment = charge("120.00")
    refunded = RefundCustomer(ORDER).decide(payment)
    assert refunded.change is not None
    assert refunded.event is not None
    assert (refunded.answer.status, refunded.answer.body["status"]) == (200, "refunded")
    first = RefundCustomer(ORDER).decide(None)
    assert first.change is not None
    assert first.event is None
    assert (first.answer.body["status"], first.answer.body["amount"]) == ("voided", "0.00")
    declined = RefundCustomer(ORDER).decide(charge("900.00"))
    assert (declined.change, declined.answer.status) == (None, 200)
    assert declined.answer.body["status"] == "declined"
