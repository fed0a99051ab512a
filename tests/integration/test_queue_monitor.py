"""Consumer lag and dead letters as gauges (issue 16, item 2), read from a real RabbitMQ."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aio_pika
import pytest
from ordermesh_shared.messaging.broker import Broker
from ordermesh_shared.messaging.monitor import QueueMonitor
from ordermesh_shared.messaging.topology import (
    Topology,
    declare_consumer_queue,
    declare_events_exchange,
)
from prometheus_client import CollectorRegistry

pytestmark = pytest.mark.integration

QUEUE = "test.monitored"


def gauge(registry: CollectorRegistry, name: str, queue: str) -> float | None:
    return registry.get_sample_value(name, {"queue": queue})


async def test_a_dead_lettered_message_shows_in_the_dead_letter_gauge(broker: Broker) -> None:
    topology = Topology()
    channel = await broker.connection.channel()
    queue = await declare_consumer_queue(channel, topology, QUEUE, ["test.*"])
    exchange = await declare_events_exchange(channel, topology)
    await exchange.publish(aio_pika.Message(b"{}"), routing_key="test.poison")
    registry = CollectorRegistry()
    monitor = QueueMonitor(broker, [QUEUE, "test.never_declared"], registry=registry)
    await until(monitor, lambda: gauge(registry, "messaging_queue_messages", QUEUE) == 1)
    assert gauge(registry, "messaging_queue_consumers", QUEUE) == 0
    assert gauge(registry, "messaging_dead_letter_messages", topology.dead_letter_queue) == 0
    # A queue nobody declared yet has no series (rather than a made-up 0).
    assert gauge(registry, "messaging_queue_messages", "test.never_declared") is None

    message = await queue.get(timeout=5)
    await message.reject(requeue=False)  # what a consumer does after its last attempt
    dead = "messaging_dead_letter_messages"
    await until(monitor, lambda: gauge(registry, dead, topology.dead_letter_queue) == 1)
    assert gauge(registry, "messaging_queue_messages", QUEUE) == 0
    await channel.close()


async def until(monitor: QueueMonitor, shown: Callable[[], bool], within: float = 10.0) -> None:
    """Refresh the monitor until ``shown()`` holds."""
    async with asyncio.timeout(within):
        while True:
            await monitor.refresh()
            if shown():
                return
            await asyncio.sleep(0.05)
