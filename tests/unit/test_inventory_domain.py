"""Inventory's rules without a database: taking stock, and what a reservation may become."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from inventory.domain import Line, Reservation, Stock
from ordermesh_shared.errors import Conflict, Rejected

ORDER = uuid.uuid4()
STOCK = {
    "KB-101": Stock("KB-101", Decimal("89.00"), 5),
    "MS-202": Stock("MS-202", Decimal("25.50"), 1),
}


def reserved() -> Reservation:
    return Reservation.take(ORDER, [Line("MS-202", 1), Line("KB-101", 2)], STOCK)


def test_taking_holds_every_line_at_its_price_in_sku_order() -> None:
    reservation = reserved()
    assert reservation.status == "reserved"
    assert [(line.sku, line.quantity, line.unit_price) for line in reservation.lines] == [
        ("KB-101", 2, Decimal("89.00")),
        ("MS-202", 1, Decimal("25.50")),
    ]
    assert reservation.total == Decimal("203.50")


@pytest.mark.parametrize(
    ("line", "reason"),
    [(Line("MS-202", 2), "out_of_stock"), (Line("ZZ-9", 1), "unknown_sku")],
)
def test_one_line_short_refuses_the_whole_order(line: Line, reason: str) -> None:
    with pytest.raises(Rejected) as refused:
        Reservation.take(ORDER, [Line("KB-101", 1), line], STOCK)
    assert refused.value.reason == reason


def test_release_and_commit_settle_a_reservation_once() -> None:
    released = reserved().release()
    assert released is not None
    assert released.status == "released"
    assert released.release() is None  # again: nothing changes
    committed = reserved().commit()
    assert committed is not None
    assert committed.commit() is None


def test_sold_units_are_not_released_and_released_ones_not_sold() -> None:
    committed = reserved().commit()
    assert committed is not None
    with pytest.raises(Conflict, match="committed"):
        committed.release()
    released = reserved().release()
    assert released is not None
    with pytest.raises(Conflict, match="released"):
        released.commit()


def test_a_release_first_leaves_a_marker_that_refuses_the_late_reserve() -> None:
    marker = Reservation.released_before_reserve(ORDER)
    assert (marker.status, marker.lines) == ("released", ())
    with pytest.raises(Conflict) as refused:
        marker.reserve_again()
    assert refused.value.reason == "released"
    reserved().reserve_again()  # a reserve under another key for a held order: fine


def test_each_change_names_its_event() -> None:
    released = reserved().release()
    assert released is not None
    event = released.event({"status": "released"})
    assert (event.aggregate_type, event.aggregate_id) == ("reservation", str(ORDER))
    assert event.event_type == "stock_released"
    assert reserved().event({}).event_type == "stock_reserved"
