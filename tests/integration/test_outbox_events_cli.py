"""``make events``: the tail prints one readable line per event, and survives junk."""

from __future__ import annotations

import asyncio
import io
import uuid
from datetime import UTC, datetime

import aio_pika
import aio_pika.exceptions
import pytest
from ordermesh_deploy.events import Tail, parse_args
from ordermesh_shared.messaging.envelope import OutgoingEvent, encode_event
from ordermesh_shared.messaging.topology import Topology, declare_events_exchange

pytestmark = pytest.mark.integration


def outgoing(sequence: int) -> OutgoingEvent:
    return OutgoingEvent(
        id=uuid.uuid4(),
        sequence=sequence,
        aggregate_type="reservation",
        aggregate_id="o-1",
        event_type="stock_reserved",
        payload={"order_id": "o-1", "lines": [{"sku": "KB-101", "quantity": 2}] * 10},
        created_at=datetime(2026, 11, 26, 12, 0, 1, 250000, tzinfo=UTC),
    )


async def test_tail_prints_one_line_per_event(rabbit_vhost: str) -> None:
    out = io.StringIO()
    tail = Tail(
        parse_args(["inventory.*", "--url", rabbit_vhost, "--count", "3", "--payload", "40"]),
        out=out,
    )
    task = asyncio.create_task(tail.run())
    connection = await aio_pika.connect(rabbit_vhost)
    async with connection, asyncio.timeout(10):
        channel = await connection.channel(on_return_raises=True)
        exchange = await declare_events_exchange(channel, Topology())
        first = encode_event(outgoing(7), service="inventory")
        while True:  # returned as unroutable until the tail's queue is bound
            try:
                await exchange.publish(first, "inventory.stock_reserved")
                break
            except aio_pika.exceptions.PublishError:
                await asyncio.sleep(0.05)
        await exchange.publish(aio_pika.Message(b"hello"), "inventory.junk")
        with pytest.raises(aio_pika.exceptions.PublishError):  # not bound by the tail
            await exchange.publish(encode_event(outgoing(8), service="payment"), "payment.charged")
        await exchange.publish(
            encode_event(outgoing(9), service="inventory"), "inventory.stock_reserved"
        )
        await task
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith(
        "inventory.stock_reserved      reservation/o-1  #7"
        '  {"order_id":"o-1","lines":[{"sku":"KB...'
    )
    assert "(not an event: not a CloudEvent: no ce-id" in lines[1]
    assert "'hello'" in lines[1]
    assert "#9" in lines[2]
