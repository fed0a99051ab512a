"""Publishing a claimed batch: pipelined publisher confirms, per-aggregate order, outage vs poison.

A batch is sent in *waves*: wave k holds the k-th event of every aggregate in the batch. The
events of one wave go out pipelined (all in flight at once, each awaiting its own confirm under
a timeout); the next wave starts once the previous one is settled. So when an event fails, its
aggregate's later events have not been sent yet, and they are *held* (left unpublished, without
counting an attempt) instead of overtaking it. Most batches hold one event per aggregate and
are a single wave.

Failures come in two kinds:

* the broker is unavailable (connection lost, channel closed, confirm timed out, publishing
  blocked by an alarm): not the event's fault, so no attempt is counted; the rest is held and
  the relay waits for the broker.
* the event itself failed (returned as unroutable under ``mandatory``, nacked, unencodable):
  an attempt is counted, and after too many the relay quarantines the row.

>>> publisher = EventPublisher(broker, service="order", topology=Topology(), timeout=5.0)
>>> outcome = await publisher.publish(events)   # outcome.confirmed, .failed, .held, .outage
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiormq.exceptions
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange

from ordermesh_shared.broker import BrokerUnavailable
from ordermesh_shared.messaging.envelope import OutgoingEvent, encode_event
from ordermesh_shared.messaging.failures import ConnectionSource, open_connection
from ordermesh_shared.messaging.topology import Topology, declare_events_exchange

log = structlog.get_logger(__name__)

PublishOne = Callable[[OutgoingEvent], Awaitable[None]]

_OUTAGES: tuple[type[BaseException], ...] = (
    TimeoutError,
    ConnectionError,  # includes aiormq's AMQPConnectionError
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    BrokerUnavailable,
)


@dataclass
class BatchOutcome:
    """What happened to each event of a batch."""

    confirmed: list[OutgoingEvent] = field(default_factory=list)
    failed: list[tuple[OutgoingEvent, BaseException]] = field(default_factory=list)
    held: list[OutgoingEvent] = field(default_factory=list)
    outage: BaseException | None = None


def is_outage(exc: BaseException) -> bool:
    """True when the broker, not the event, is at fault."""
    return isinstance(exc, _OUTAGES)


def describe(exc: BaseException) -> str:
    """The text stored in ``outbox.last_error``."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def plan_waves(events: Sequence[OutgoingEvent]) -> list[list[OutgoingEvent]]:
    """Split a batch (in id order) so that wave k holds each aggregate's k-th event."""
    waves: list[list[OutgoingEvent]] = []
    seen: dict[tuple[str, str], int] = defaultdict(int)
    for event in events:
        key = (event.aggregate_type, event.aggregate_id)
        index = seen[key]
        seen[key] += 1
        if index == len(waves):
            waves.append([])
        waves[index].append(event)
    return waves


async def publish_in_order(events: Sequence[OutgoingEvent], publish: PublishOne) -> BatchOutcome:
    """Publish wave by wave; a failed event holds back the rest of its aggregate."""
    outcome = BatchOutcome()
    blocked: set[tuple[str, str]] = set()
    for wave in plan_waves(events):
        ready = [e for e in wave if _key(e) not in blocked and outcome.outage is None]
        outcome.held.extend(e for e in wave if _key(e) in blocked or outcome.outage is not None)
        results = await asyncio.gather(*(publish(e) for e in ready), return_exceptions=True)
        for event, result in zip(ready, results, strict=True):
            if result is None:
                outcome.confirmed.append(event)
                continue
            blocked.add(_key(event))
            _record_failure(outcome, event, result)
    return outcome


def _record_failure(outcome: BatchOutcome, event: OutgoingEvent, exc: BaseException) -> None:
    if not isinstance(exc, Exception):
        raise exc  # cancellation and the like are not publish results
    if is_outage(exc):
        outcome.outage = outcome.outage or exc
        outcome.held.append(event)
    else:
        outcome.failed.append((event, exc))


def _key(event: OutgoingEvent) -> tuple[str, str]:
    return (event.aggregate_type, event.aggregate_id)


class EventPublisher:
    """Publishes outbox events to the events exchange with confirms and ``mandatory``.

    >>> publisher = EventPublisher(broker, service="payment", topology=Topology(), timeout=5)
    >>> await publisher.ready()                     # raises BrokerUnavailable while down
    >>> outcome = await publisher.publish(events)
    """

    def __init__(
        self, source: ConnectionSource, *, service: str, topology: Topology, timeout: float
    ) -> None:
        self._source = source
        self._service = service
        self._topology = topology
        self._timeout = timeout
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def ready(self) -> None:
        """Open the confirm channel and declare the exchange if needed."""
        if self._exchange is not None and self._channel is not None:
            if not self._channel.is_closed:
                return
            await self.close()  # e.g. closed by the broker after a channel error
        connection = open_connection(self._source)
        try:
            async with asyncio.timeout(self._timeout):
                # on_return_raises: an unroutable message fails instead of being "confirmed".
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                self._channel = channel
                self._exchange = await declare_events_exchange(channel, self._topology)
        except (TimeoutError, RuntimeError, ConnectionError) as exc:
            # RuntimeError: the robust connection dropped between the check and the call.
            await self.close()
            raise BrokerUnavailable(f"cannot open a publisher channel: {describe(exc)}") from exc

    async def publish(self, events: Sequence[OutgoingEvent]) -> BatchOutcome:
        """Publish ``events`` (in id order); see :func:`publish_in_order`."""
        await self.ready()
        return await publish_in_order(events, self._publish_one)

    async def close(self) -> None:
        channel, self._channel, self._exchange = self._channel, None, None
        if channel is not None and not channel.is_closed:
            try:
                await channel.close()
            except Exception as exc:  # closing a dead channel: nothing left to release
                log.debug("outbox.channel_close_failed", error=str(exc))

    async def _publish_one(self, event: OutgoingEvent) -> None:
        exchange = self._exchange
        if exchange is None:
            raise BrokerUnavailable("publisher channel is not open")
        message = encode_event(event, service=self._service)
        routing_key = self._topology.routing_key(self._service, event.event_type)
        # publish(timeout=) does not cover waiting for a reconnecting channel; this does.
        async with asyncio.timeout(self._timeout):
            await exchange.publish(message, routing_key, mandatory=True)
