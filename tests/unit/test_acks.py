"""The ack window's rule: acknowledge up to the oldest unsettled delivery, in one frame."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from aio_pika.abc import AbstractIncomingMessage
from ordermesh_shared.messaging.acks import AckWindow


@dataclass
class _Channel:
    frames: list[tuple[str, int, bool]] = field(default_factory=list)  # (verb, tag, multiple)
    is_closed: bool = False


@dataclass
class _Message:
    channel: _Channel
    delivery_tag: int

    async def ack(self, multiple: bool = False) -> None:
        self.channel.frames.append(("ack", self.delivery_tag, multiple))

    async def reject(self, requeue: bool = False) -> None:
        self.channel.frames.append(("reject", self.delivery_tag, False))


def deliver(acks: AckWindow, channel: _Channel, count: int) -> list[AbstractIncomingMessage]:
    messages = [cast(Any, _Message(channel, tag)) for tag in range(1, count + 1)]
    for message in messages:
        acks.delivered(message)
    return messages


async def test_a_batch_settled_together_is_one_frame() -> None:
    acks, channel = AckWindow(max_waiting=50), _Channel()
    messages = deliver(acks, channel, 10)
    await acks.settled_all(messages)
    assert channel.frames == [("ack", 10, True)]
    assert acks.frames == 1


async def test_nothing_is_acknowledged_past_an_unsettled_delivery() -> None:
    # Lanes settle out of order: 2 and 3 wait for 1 (a multiple ack of 3 would take 1 too,
    # and a crash then would lose it); 1 settling acknowledges all three in one frame.
    acks, channel = AckWindow(max_waiting=50), _Channel()
    one, two, three, four = deliver(acks, channel, 4)
    await acks.settled(two)
    await acks.settled(three)
    assert channel.frames == []
    await acks.settled(one)
    assert channel.frames == [("ack", 3, True)]
    await acks.settled(four)
    assert channel.frames == [("ack", 3, True), ("ack", 4, True)]


async def test_a_rejected_delivery_does_not_hold_the_window() -> None:
    acks, channel = AckWindow(max_waiting=50), _Channel()
    one, two, three = deliver(acks, channel, 3)
    await acks.settled(three)
    await acks.rejected(one)
    assert channel.frames == [("reject", 1, False)]
    await acks.settled(two)
    assert channel.frames == [("reject", 1, False), ("ack", 3, True)]


async def test_behind_a_slow_delivery_settled_ones_go_one_by_one() -> None:
    # Unacknowledged messages count against the prefetch: with max_waiting settled behind
    # delivery 1, they are acknowledged singly, and 1 is later acknowledged on its own.
    acks, channel = AckWindow(max_waiting=3), _Channel()
    slow, *rest = deliver(acks, channel, 5)
    for message in rest[:2]:
        await acks.settled(message)
    assert channel.frames == []
    await acks.settled(rest[2])
    assert channel.frames == [("ack", 2, False), ("ack", 3, False), ("ack", 4, False)]
    await acks.settled(slow)
    assert channel.frames[3:] == [("ack", 1, True)]
    await acks.settled(rest[3])
    assert channel.frames[4:] == [("ack", 5, True)]


async def test_each_channel_has_a_window_of_its_own() -> None:
    # Tags restart on the channel a reconnect opens; the old channel's window is dropped.
    acks, old = AckWindow(max_waiting=50), _Channel()
    (stuck,) = deliver(acks, old, 1)
    old.is_closed = True
    new = _Channel()
    messages = deliver(acks, new, 2)
    await acks.settled_all(messages)
    assert new.frames == [("ack", 2, True)]
    assert old.frames == []
    assert stuck.delivery_tag == 1
