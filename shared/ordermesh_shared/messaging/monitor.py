"""Consumer lag and dead letters as Prometheus gauges, read from the broker.

The consumers count what they handled (``messaging_events_consumed_total``), but not what
waits for them: that is the queue's depth, which only the broker knows. :class:`QueueMonitor`
reads it every few seconds with a passive declare (the management plugin is not needed, and a
passive declare never creates a queue or changes its arguments) for the service's consumer
queues and the dead-letter queue:

* ``messaging_queue_messages{queue}``: messages ready in a consumer queue (its lag);
* ``messaging_queue_consumers{queue}``: consumers attached to it (0: nobody reads it);
* ``messaging_dead_letter_messages{queue}``: messages waiting in the dead-letter queue for an
  operator (``x-death`` on each says which queue gave up on it and why).

A queue that cannot be read (the broker is down, the queue not declared yet) has its series
removed until it can be read again, rather than showing a stale depth.

>>> monitor = QueueMonitor(ctx.broker, ["order.timeline"], registry=ctx.metrics.registry)
>>> tasks.supervise(monitor.run, name="queue-monitor")
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from aiormq.exceptions import ChannelNotFoundEntity
from prometheus_client import CollectorRegistry, Gauge

from ordermesh_shared.messaging.failures import ConnectionSource, is_transient, open_connection
from ordermesh_shared.messaging.topology import Topology

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """What a passive declare says of one queue."""

    queue: str
    messages: int
    consumers: int


class QueueMonitor:
    """Keeps the queue gauges of one service fresh; runs until cancelled."""

    def __init__(
        self,
        broker: ConnectionSource,
        queues: Sequence[str],
        *,
        registry: CollectorRegistry,
        topology: Topology | None = None,
        interval: float = 5.0,
    ) -> None:
        self._broker = broker
        self._queues = tuple(queues)
        self._dead_letters = (topology or Topology()).dead_letter_queue
        self._interval = interval
        self.messages = Gauge(
            "messaging_queue_messages",
            "Messages ready in a consumer queue, not yet delivered: the consumer's lag.",
            ["queue"],
            registry=registry,
        )
        self.consumers = Gauge(
            "messaging_queue_consumers",
            "Consumers attached to a consumer queue (0: nobody reads it).",
            ["queue"],
            registry=registry,
        )
        self.dead_letters = Gauge(
            "messaging_dead_letter_messages",
            "Messages in the dead-letter queue, waiting for an operator.",
            ["queue"],
            registry=registry,
        )

    async def run(self) -> None:
        """Refresh the gauges every ``interval`` seconds."""
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval)

    async def refresh(self) -> None:
        """Read every queue once and set (or, when unreadable, drop) its series."""
        for queue in self._queues:
            self._show(self.messages, self.consumers, queue, await self._read(queue))
        depth = await self._read(self._dead_letters)
        self._show(self.dead_letters, None, self._dead_letters, depth)

    async def _read(self, queue: str) -> QueueDepth | None:
        try:
            return await read_depth(self._broker, queue)
        except Exception as exc:
            # A missing queue closes the channel with 404: not transient, but not a bug
            # either (its consumer has not declared it yet).
            if not (is_transient(exc) or isinstance(exc, ChannelNotFoundEntity)):
                raise  # the supervisor logs it and restarts the loop
            log.debug("queue_monitor.unreadable", queue=queue, error=str(exc))
            return None

    @staticmethod
    def _show(
        depth_gauge: Gauge, consumers: Gauge | None, queue: str, depth: QueueDepth | None
    ) -> None:
        gauges = [g for g in (depth_gauge, consumers) if g is not None]
        if depth is None:
            for gauge in gauges:
                _forget(gauge, queue)
            return
        depth_gauge.labels(queue).set(depth.messages)
        if consumers is not None:
            consumers.labels(queue).set(depth.consumers)


async def read_depth(broker: ConnectionSource, queue: str) -> QueueDepth:
    """The ready messages and consumers of ``queue``, by a passive declare."""
    # A channel per read: a passive declare of a missing queue closes its channel.
    channel = await open_connection(broker).channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
    finally:
        if not channel.is_closed:
            await channel.close()
    result = declared.declaration_result
    return QueueDepth(queue, result.message_count or 0, result.consumer_count or 0)


def _forget(gauge: Gauge, queue: str) -> None:
    with contextlib.suppress(KeyError):  # never shown
        gauge.remove(queue)
