"""Publishing a batch as per-aggregate chains: a failure holds back its aggregate only, an
outage stops the batch, and no attempt is blamed on the events for an outage."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import aiormq.exceptions
import pytest
from ordermesh_shared.messaging import publisher as publisher_module
from ordermesh_shared.messaging.broker import BrokerUnavailable
from ordermesh_shared.messaging.envelope import OutgoingEvent
from ordermesh_shared.messaging.publisher import EventPublisher, chains, is_outage, publish_in_order
from ordermesh_shared.messaging.topology import Topology
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
    """Records publishes; fails the events whose sequence is in ``fail`` at once, confirms the
    others a loop turn later (so the chains interleave, as with a real broker)."""

    def __init__(self, fail: dict[int, Exception] | None = None) -> None:
        self.fail = fail or {}
        self.sent: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def publish(self, event: OutgoingEvent) -> None:
        self.sent.append(f"{event.aggregate_id}{event.sequence}")
        if event.sequence in self.fail:
            raise self.fail[event.sequence]
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0)
        self.in_flight -= 1


def test_a_chain_per_aggregate_in_id_order() -> None:
    grouped = chains(batch("a", "b", "a", "c", "a", "b"))
    assert [names(c) for c in grouped] == [["a1", "a3", "a5"], ["b2", "b6"], ["c4"]]


async def test_aggregates_are_pipelined_and_each_aggregate_is_sent_in_order() -> None:
    broker = FakeBroker()
    await publish_in_order(batch("a", "b", "c", "a", "b", "a"), broker.publish)
    assert broker.most_in_flight == 3  # one per aggregate at a time
    assert [n for n in broker.sent if n.startswith("a")] == ["a1", "a4", "a6"]


async def test_everything_confirmed_when_nothing_fails() -> None:
    events = batch("a", "b", "a")
    broker = FakeBroker()
    outcome = await publish_in_order(events, broker.publish)
    assert names(outcome.confirmed) == ["a1", "b2", "a3"]  # reported in id order
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
    outcome = await publish_in_order(batch("a", "b", "a", "b"), broker.publish)
    assert isinstance(outcome.outage, TimeoutError)
    assert outcome.failed == []  # no attempt is counted against any row
    assert names(outcome.confirmed) == ["a1"]  # confirmed before the outage: will be marked
    assert names(outcome.held) == ["b2", "a3", "b4"]
    assert broker.sent == ["a1", "b2"]  # nothing more was tried once the broker failed


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


async def test_a_stuck_confirm_holds_the_unconfirmed_rest_of_the_batch() -> None:
    # One timer for the batch: when it runs out, what was confirmed stays confirmed and
    # everything else (the stuck event, its chain, the chains not finished) is held.
    stuck = asyncio.Event()

    async def publish(event: OutgoingEvent) -> None:
        if event.aggregate_id == "a" and event.sequence == 2:
            await stuck.wait()  # never confirmed

    outcome = await publish_in_order(batch("a", "a", "a", "b"), publish, within=0.2)
    assert names(outcome.confirmed) == ["a1", "b4"]
    assert names(outcome.held) == ["a2", "a3"]
    assert isinstance(outcome.outage, TimeoutError)
    assert outcome.failed == []


async def test_a_slow_but_steady_chain_is_not_an_outage() -> None:
    # The timer measures the gap between confirms, not the batch: one aggregate's five
    # events confirmed 150 ms apart take 750 ms in all, more than the 500 ms allowed (the
    # slack between a gap and the limit absorbs a loaded machine's scheduling delays).
    async def publish(event: OutgoingEvent) -> None:
        await asyncio.sleep(0.15)

    outcome = await publish_in_order(batch("a", "a", "a", "a", "a"), publish, within=0.5)
    assert names(outcome.confirmed) == ["a1", "a2", "a3", "a4", "a5"]
    assert outcome.outage is None


class FakeChannel:
    def __init__(self, opened: list[FakeChannel]) -> None:
        self.is_closed = False
        opened.append(self)

    async def close(self) -> None:
        self.is_closed = True


async def test_batches_reopening_the_channel_together_open_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The relay's two batches share one publisher; after the broker closed its channel both
    # may ask for it at once. Two channels opened would leave one open with no owner.
    opened: list[FakeChannel] = []

    class FakeConnection:
        async def channel(self, **_options: object) -> FakeChannel:
            await asyncio.sleep(0.01)
            return FakeChannel(opened)

    async def declare(_channel: object, _topology: object) -> object:
        await asyncio.sleep(0.01)
        return object()

    monkeypatch.setattr(publisher_module, "open_connection", lambda _source: FakeConnection())
    monkeypatch.setattr(publisher_module, "declare_events_exchange", declare)
    source: Any = object()  # never used: open_connection is replaced
    publisher = EventPublisher(source, service="shop", topology=Topology(), timeout=1.0)
    await asyncio.gather(publisher.ready(), publisher.ready())
    await publisher.close()
    assert len(opened) == 1
    assert all(channel.is_closed for channel in opened)
