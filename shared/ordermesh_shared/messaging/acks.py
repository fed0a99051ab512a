"""Acknowledging many deliveries with one frame, safely beside parallel lanes.

A consumer's lanes settle messages out of delivery order, so a plain ``ack(multiple=True)``
would acknowledge a message another lane is still applying (and a crash would lose it). The
window acknowledges up to the oldest delivery not yet settled: one ``basic.ack`` with
``multiple`` for the whole run of settled ones before it. Behind a message that takes long
(retried with backoff), settled ones are acknowledged one by one once ``max_waiting`` are
waiting: unacknowledged messages count against the prefetch, and the broker would stop
delivering.

Delivery tags are per channel; after a reconnect the robust channel delivers on a new one,
and the old one's unsettled messages are redelivered by the broker (the inbox makes them
duplicates), so each channel has a window of its own and a closed channel's is dropped.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractIncomingMessage


@dataclass
class _Channel:
    delivered: deque[int] = field(default_factory=deque)  # tags in delivery order
    waiting: dict[int, AbstractIncomingMessage] = field(default_factory=dict)  # settled
    gone: set[int] = field(default_factory=set)  # acked or rejected on their own
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one frame at a time


class AckWindow:
    """Tracks deliveries per channel and acknowledges settled runs of them together.

    >>> acks = AckWindow(max_waiting=50)
    >>> acks.delivered(message)        # in delivery order (the consume callback)
    >>> await acks.settled(message)    # applied: acknowledged now or with a later one
    >>> await acks.rejected(message)   # dead-lettered at once
    """

    def __init__(self, *, max_waiting: int) -> None:
        self._max_waiting = max_waiting
        self._channels: dict[int, tuple[Any, _Channel]] = {}
        self.frames = 0  # basic.ack frames sent (tests and benchmarks compare with messages)

    def delivered(self, message: AbstractIncomingMessage) -> None:
        self._window(message).delivered.append(_tag(message))

    async def settled(self, message: AbstractIncomingMessage) -> None:
        await self.settled_all([message])

    async def settled_all(self, messages: list[AbstractIncomingMessage]) -> None:
        """Settle a batch; a frame per channel at most (and none while older ones wait)."""
        windows: dict[int, _Channel] = {}
        for message in messages:
            window = self._window(message)
            window.waiting[_tag(message)] = message
            windows[id(window)] = window
        for window in windows.values():
            async with window.lock:
                await self._flush(window)

    async def rejected(self, message: AbstractIncomingMessage) -> None:
        window = self._window(message)
        async with window.lock:
            await message.reject(requeue=False)
            window.gone.add(_tag(message))
            await self._flush(window)

    async def _flush(self, window: _Channel) -> None:
        last = None
        while window.delivered:
            tag = window.delivered[0]
            if tag in window.gone:
                window.gone.discard(tag)
            elif tag in window.waiting:
                last = window.waiting.pop(tag)
            else:
                break  # the oldest unsettled delivery: nothing after it may be acked yet
            window.delivered.popleft()
        if last is not None:
            self.frames += 1
            await last.ack(multiple=True)
        if len(window.waiting) >= self._max_waiting:
            await self._ack_one_by_one(window)

    async def _ack_one_by_one(self, window: _Channel) -> None:
        waiting, window.waiting = window.waiting, {}
        for tag, message in waiting.items():
            window.gone.add(tag)
            self.frames += 1
            await message.ack()

    def _window(self, message: AbstractIncomingMessage) -> _Channel:
        channel = message.channel
        key = id(channel)
        known = self._channels.get(key)
        if known is None or known[0] is not channel:
            self._forget_closed()
            known = (channel, _Channel())
            self._channels[key] = known
        return known[1]

    def _forget_closed(self) -> None:
        for key, (channel, _) in list(self._channels.items()):
            if getattr(channel, "is_closed", False):
                del self._channels[key]


def _tag(message: AbstractIncomingMessage) -> int:
    tag = message.delivery_tag
    assert tag is not None, "a consumed message has a delivery tag"
    return tag
