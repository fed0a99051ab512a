"""Publishing a batch in waves: failures hold back their aggregate only; outages stop the batch."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import aiormq.exceptions
import pytest
from ordermesh_shared.broker import BrokerUnavailable
from ordermesh_shared.messaging.envelope import OutgoingEvent
from ordermesh_shared.outbox.publisher import is_outage, plan_waves, publish_in_order
from pamqp.commands import Basic


def batch(*aggregates: str) -> list[OutgoingEvent]:
    """Events in id order; ``"a"`` twice means two events of aggregate a."""
    return [
        OutgoingEvent(
            id=uuid.uuid4(),
            sequence=n,
            aggregate_type="thing",
            aggregate_id=aggregate,
            event_type="updated",
            payload={},
            created_at=datetime.now(UTC),
        )
        for n, aggregate in enumerate(aggregates, start=1)
    ]


def names(events: Iterable[OutgoingEvent]) -> list[str]:
    return [f"{e.aggregate_id}{e.sequence}" for e in events]


class FakeBroker:
    """Records publish order; fails the events whose sequence is in ``fail``."""

    def __init__(self, fail: dict[int, Exception] | None = None) -> None:
        self.fail = fail or {}
        self.sent: list[str] = []

    async def publish(self, event: OutgoingEvent) -> None:
        self.sent.append(f"{event.aggregate_id}{event.sequence}")
        if event.sequence in self.fail:
            raise self.fail[event.sequence]


def test_each_wave_holds_one_event_per_aggregate_in_id_order() -> None:
    waves = plan_waves(batch("a", "b", "a", "c", "a", "b"))
    assert [names(w) for w in waves] == [["a1", "b2", "c4"], ["a3", "b6"], ["a5"]]


async def test_everything_confirmed_when_nothing_fails() -> None:
    events = batch("a", "b", "a")
    broker = FakeBroker()
    outcome = await publish_in_order(events, broker.publish)
    assert names(outcome.confirmed) == ["a1", "b2", "a3"]
    assert (outcome.failed, outcome.held, outcome.outage) == ([], [], None)


async def test_failed_event_holds_back_its_aggregate_but_not_others() -> None:
    unroutable = aiormq.exceptions.DeliveryError(None, Basic.Nack(delivery_tag=1))
    broker = FakeBroker(fail={1: unroutable})
    outcome = await publish_in_order(batch("a", "b", "a", "b", "a"), broker.publish)
    assert [(names([e])[0], exc) for e, exc in outcome.failed] == [("a1", unroutable)]
    assert names(outcome.held) == ["a3", "a5"]  # never sent: they would overtake a1
    assert names(outcome.confirmed) == ["b2", "b4"]
    assert "a3" not in broker.sent


async def test_outage_stops_the_batch_without_blaming_the_events() -> None:
    broker = FakeBroker(fail={2: TimeoutError()})
    outcome = await publish_in_order(batch("a", "b", "c", "a", "b"), broker.publish)
    assert isinstance(outcome.outage, TimeoutError)
    assert outcome.failed == []  # no attempt is counted against any row
    assert names(outcome.confirmed) == ["a1", "c3"]  # confirmed before the outage: marked
    assert names(outcome.held) == ["b2", "a4", "b5"]
    assert broker.sent == ["a1", "b2", "c3"]  # nothing more was tried


@pytest.mark.parametrize(
    ("exc", "outage"),
    [
        (TimeoutError(), True),
        (BrokerUnavailable("down"), True),
        (aiormq.exceptions.ConnectionClosed(320, "CONNECTION_FORCED"), True),
        (aiormq.exceptions.ChannelInvalidStateError("closed"), True),
        (
            aiormq.exceptions.DeliveryError(None, Basic.Nack(delivery_tag=1)),
            False,
        ),  # a nack: this message
        (ValueError("cannot encode"), False),
    ],
)
def test_outage_or_the_events_fault(exc: Exception, outage: bool) -> None:
    assert is_outage(exc) is outage
