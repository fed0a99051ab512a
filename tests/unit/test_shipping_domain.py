"""Shipping's rules without a database: where we ship, and what a shipment may become."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from ordermesh_shared.errors import Conflict, Rejected
from shipping.domain import Destination, Shipment

ORDER = uuid.uuid4()
NOW = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)


def created() -> Shipment:
    return Shipment.create(ORDER, Destination("DE", supported=True), now=NOW)


def test_a_shipment_is_created_to_a_supported_destination() -> None:
    shipment = created()
    assert (shipment.order_id, shipment.destination, shipment.status) == (ORDER, "DE", "created")
    assert (shipment.created_at, shipment.updated_at) == (NOW, NOW)
    assert not shipment.is_marker


def test_an_unsupported_destination_is_refused() -> None:
    with pytest.raises(Rejected, match="AQ") as refused:
        Shipment.create(ORDER, Destination("AQ", supported=False), now=NOW)
    assert refused.value.reason == "unsupported_destination"


def test_a_create_again_gets_the_created_shipment_but_not_a_cancelled_one() -> None:
    created().create_again()  # a create under another key for a shipped order: fine
    cancelled = created().cancel(now=LATER)
    assert cancelled is not None
    with pytest.raises(Conflict) as refused:
        cancelled.create_again()
    assert refused.value.reason == "cancelled"


def test_a_cancel_changes_a_created_shipment_once() -> None:
    shipment = created()
    cancelled = shipment.cancel(now=LATER)
    assert cancelled is not None
    assert (cancelled.id, cancelled.status) == (shipment.id, "cancelled")
    assert cancelled.destination == "DE"
    assert (cancelled.created_at, cancelled.updated_at) == (NOW, LATER)
    assert cancelled.cancel(now=LATER + timedelta(minutes=1)) is None  # again: nothing changes


def test_a_cancel_first_leaves_a_marker_that_refuses_the_late_create() -> None:
    marker = Shipment.cancelled_before_create(ORDER, now=NOW)
    assert (marker.destination, marker.status, marker.is_marker) == (None, "cancelled", True)
    assert marker.cancel(now=LATER) is None  # a repeated cancel: the marker as it is
    with pytest.raises(Conflict) as refused:
        marker.create_again()
    assert refused.value.reason == "cancelled"


def test_each_change_names_its_event() -> None:
    event = created().event({"status": "created"})
    assert (event.aggregate_type, event.aggregate_id) == ("shipment", str(ORDER))
    assert event.event_type == "shipment_created"
    cancelled = created().cancel(now=LATER)
    assert cancelled is not None
    assert cancelled.event({}).event_type == "shipment_cancelled"
