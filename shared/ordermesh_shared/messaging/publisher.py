"""Publishing a claimed batch: pipelined publisher confirms, per-aggregate order, outage vs poison.

The batch is split into one *chain* per aggregate (its events in id order). All chains run at
once, so the broker sees many publishes in flight, each awaiting its own confirm (a batch
with no confirm for ``timeout`` seconds is an outage); within a chain an event is sent only
after the previous one was confirmed. So when an event fails, its aggregate's later events
have not been sent, and they are *held* (left unpublished, without counting an attempt)
instead of overtaking it. Events of different aggregates never wait for each other; most
batches hold one or two events per aggregate.

Failures come in two kinds:

* the broker is unavailable (connection lost, channel closed, confirm timed out, publishing
  blocked by an alarm): not the event's fault, so no attempt is counted; every chain stops,
  the rest is held and the relay waits for the broker.
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

from ordermesh_shared.messaging.broker import BrokerUnavailable
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


def chains(events: Sequence[OutgoingEvent]) -> list[list[OutgoingEvent]]:
    """Group a batch (in id order) by aggregate, keeping id order within each group."""
    grouped: dict[tuple[str, str], list[OutgoingEvent]] = defaultdict(list)
    for event in events:
        grouped[_key(event)].append(event)
    return list(grouped.values())


async def publish_in_order(
    events: Sequence[OutgoingEvent], publish: PublishOne, *, within: float | None = None
) -> BatchOutcome:
    """Publish every aggregate's chain concurrently; a failure holds back the rest of its chain.

    ``within`` (seconds): one timer for the batch, pushed back as confirms come in. When
    none came for that long (at least half of it) the broker is stuck: what is not confirmed
    is held, as in any outage. (A long chain of one aggregate, confirmed one by one, may take
    longer in all.)
    """
    outcome = BatchOutcome()
    try:
        async with asyncio.timeout(within) as timer:
            progress = _Progress(timer, within)
            await asyncio.gather(
                *(_publish_chain(chain, publish, outcome, progress) for chain in chains(events))
            )
    except TimeoutError as exc:
        settled = {e.sequence for e in outcome.confirmed} | {e.sequence for e in outcome.held}
        settled.update(e.sequence for e, _ in outcome.failed)
        outcome.held.extend(e for e in events if e.sequence not in settled)
        outcome.outage = outcome.outage or exc
    # Gathered in completion order: give callers (and logs) the batch's id order back.
    for settled_list in (outcome.confirmed, outcome.held):
        settled_list.sort(key=lambda e: e.sequence)
    outcome.failed.sort(key=lambda pair: pair[0].sequence)
    return outcome


class _Progress:
    """Pushes the batch's deadline back when an event is confirmed."""

    def __init__(self, timer: asyncio.Timeout, within: float | None) -> None:
        self._timer = timer
        self._within = within
        self._loop = asyncio.get_running_loop()

    def made(self) -> None:
        if self._within is None:
            return
        # Only once half the time is gone: a new timer per confirm costs more than the
        # publish's own bookkeeping. A stuck broker is still seen within 0.5-1x ``within``.
        now = self._loop.time()
        deadline = self._timer.when()
        if deadline is not None and deadline - now < self._within / 2:
            self._timer.reschedule(now + self._within)


async def _publish_chain(
    chain: list[OutgoingEvent], publish: PublishOne, outcome: BatchOutcome, progress: _Progress
) -> None:
    for index, event in enumerate(chain):
        if outcome.outage is not None:
            outcome.held.extend(chain[index:])
            return
        try:
            await publish(event)
        except Exception as exc:
            _record_failure(outcome, event, exc)
            outcome.held.extend(chain[index + 1 :])
            return
        outcome.confirmed.append(event)
        progress.made()


def _record_failure(outcome: BatchOutcome, event: OutgoingEvent, exc: Exception) -> None:
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
        self._opening = asyncio.Lock()

    async def ready(self) -> None:
        """Open the confirm channel and declare the exchange if needed."""
        if self._is_open():
            return
        # The relay's pipelined batches share this publisher: one opens, the other waits
        # (two channels opened at once would leave one open and unowned).
        async with self._opening:
            if self._is_open():
                return
            await self.close()  # e.g. closed by the broker after a channel error
            await self._open()

    def _is_open(self) -> bool:
        channel = self._channel
        return self._exchange is not None and channel is not None and not channel.is_closed

    async def _open(self) -> None:
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
        return await publish_in_order(events, self._publish_one, within=self._timeout)

    async def close(self) -> None:
        """Close the channel, even one closed by the broker: a robust channel left open in
        our books would be restored (and leaked) at the next reconnect."""
        channel, self._channel, self._exchange = self._channel, None, None
        if channel is not None:
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
        # No timeout here: publish_in_order's covers the batch, and unlike publish(timeout=)
        # it also covers waiting for a reconnecting channel.
        await exchange.publish(message, routing_key, mandatory=True)
