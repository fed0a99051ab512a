"""Consuming events: each applied exactly once in effect, failures dead-lettered, never dropped.

For every message::

    decode the CloudEvent                     (unreadable: reject -> dead-letter queue at once)
    BEGIN; INSERT INTO inbox ... ON CONFLICT DO NOTHING; handler(conn, event) if new; COMMIT
    ack                                       (only after the commit)

Messages that are already waiting when a lane gets to them are applied together, in one
transaction (one inbox insert for all, then the handler for each new one, or the
subscription's ``batch_handler`` once): under load a lane pays one commit for many events
instead of one each. A subscription whose batch is one SQL statement (``batch_statement``)
pays one round trip: the inbox insert and the statement run as one, with no BEGIN or COMMIT.
If anything in a batch fails, the whole batch rolls back and its messages are applied one at
a time as above, so one bad message cannot hold up the others.

Acknowledgements are gathered: a settled message is acknowledged together with every earlier
delivery of its channel once those are settled too, by one ``basic.ack`` with ``multiple``
(an ack per message was one frame, and its CPU, per event).

A redelivered message (the broker restarted before our ack arrived, or the relay published it
twice) finds its id in the inbox and is acknowledged without running the handler again.

Messages are processed in order per aggregate: they are spread over ``concurrency`` lanes by
aggregate, and each lane runs one message at a time in arrival order.

When the handler raises, the transaction rolls back and the lane retries the message itself,
with a growing delay, rather than returning it to the queue (where the aggregate's next event
would overtake it). Attempts are counted from the queue's ``x-delivery-count`` (earlier
deliveries, e.g. to a consumer that crashed) plus the ones made here; at ``max_deliveries`` the
message is rejected to the dead-letter exchange. When the database is unreachable, that is not
the message's fault: the lane waits for the database without counting attempts, so an outage
does not dead-letter everything.

>>> async def on_event(conn: DbConn, event: Event) -> None:
...     await conn.execute("INSERT INTO timeline ...", event.aggregate_id, event.type)
>>> consumer = EventConsumer(db, broker, Subscription("order.timeline", ["#"], on_event))
>>> tasks.supervise(consumer.run, name="timeline-consumer")
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from prometheus_client import CollectorRegistry, Counter

from ordermesh_shared.database import Database, DbConn
from ordermesh_shared.messaging.acks import AckWindow
from ordermesh_shared.messaging.broker import BrokerUnavailable
from ordermesh_shared.messaging.envelope import BadEnvelope, Event, decode_event
from ordermesh_shared.messaging.failures import ConnectionSource, is_transient, open_connection
from ordermesh_shared.messaging.topology import (
    DEFAULT_MAX_DELIVERIES,
    Topology,
    declare_consumer_queue,
)
from ordermesh_shared.tracing import consuming_batch_span, consuming_span

log = structlog.get_logger(__name__)

Handler = Callable[[DbConn, Event], Awaitable[None]]
BatchHandler = Callable[[DbConn, Sequence[Event]], Awaitable[None]]
# A batch as one data-modifying SQL statement and its parameters, numbered from $5 (the inbox
# insert takes $1-$4). It runs as a CTE beside the inbox insert and must apply only the
# events whose ids the CTE ``fresh(message_id)`` returns: the ones not seen before.
BatchStatement = Callable[[Sequence[Event]], tuple[str, Sequence[Any]]]


@dataclass(frozen=True, slots=True)
class Subscription:
    """A consumer's queue, what it is bound to, and what applies each event.

    >>> Subscription("order.timeline", ["#"], record_timeline_event, max_deliveries=5)

    ``batch_handler``, when given, applies a batch's new events in one call (say, one
    multi-row insert); ``handler`` still applies a message retried on its own.
    """

    queue: str
    bindings: Sequence[str]
    handler: Handler
    batch_handler: BatchHandler | None = None
    batch_statement: BatchStatement | None = None  # preferred to batch_handler when given
    batch_size: int = 50  # messages a lane applies in one transaction, at most
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    prefetch: int = 100
    concurrency: int = 8  # lanes (each commits on its own); one aggregate stays in one lane
    retry_delay: float = 0.2  # before retrying a failed message; doubles per attempt
    retry_delay_max: float = 5.0


class ConsumerMetrics:
    """``messaging_events_consumed_total{queue, outcome}``.

    Outcomes: applied, duplicate, retried, dead_lettered (``*_unsettled``: the ack or reject
    could not be sent; the broker redelivers).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.consumed = Counter(
            "messaging_events_consumed_total",
            "Messages handled by a consumer, by queue and outcome.",
            ["queue", "outcome"],
            registry=registry,
        )


@dataclass
class _Lane:
    messages: asyncio.Queue[AbstractIncomingMessage] = field(default_factory=asyncio.Queue)


class EventConsumer:
    """Consumes one queue into one handler; runs until cancelled, across broker restarts.

    >>> consumer = EventConsumer(db, broker, subscription, topology=Topology())
    >>> tasks.supervise(consumer.run, name="consumer")
    >>> consumer.counts        # {"applied": 10, "duplicate": 1, ...} (also a metric)
    """

    def __init__(
        self,
        db: Database,
        broker: ConnectionSource,
        subscription: Subscription,
        *,
        topology: Topology | None = None,
        metrics: ConsumerMetrics | None = None,
    ) -> None:
        self.subscription = subscription
        self._db = db
        self._broker = broker
        self._topology = topology or Topology()
        self._metrics = metrics
        self._lanes = [_Lane() for _ in range(max(1, subscription.concurrency))]
        # Up to half the prefetch settled behind one slow message before acking one by one:
        # unacknowledged messages count against the prefetch, and the broker would stop.
        self._acks = AckWindow(max_waiting=max(1, subscription.prefetch // 2))
        self.counts: dict[str, int] = {}
        self.subscribed = asyncio.Event()  # the queue exists and is being consumed

    @property
    def ack_frames(self) -> int:
        """``basic.ack`` frames sent so far (fewer than messages: they are gathered)."""
        return self._acks.frames

    async def run(self) -> None:
        """Declare the queue, consume it, and apply events until cancelled."""
        channel = await self._open_channel()
        try:
            async with asyncio.TaskGroup() as group:
                for index, lane in enumerate(self._lanes):
                    group.create_task(self._drain(lane), name=f"{self.subscription.queue}-{index}")
        finally:
            await _close_quietly(channel)

    async def _open_channel(self) -> AbstractChannel:
        """Retry until the broker is there; the robust channel then survives reconnects."""
        delay = 0.1
        while True:
            try:
                return await self._subscribe()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                queue = self.subscription.queue
                log.warning("consumer.broker_unavailable", queue=queue, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    async def _subscribe(self) -> AbstractChannel:
        sub = self.subscription
        try:
            channel = await open_connection(self._broker).channel()
        except RuntimeError as exc:  # the robust connection dropped after the check
            raise BrokerUnavailable(str(exc)) from exc
        try:
            await channel.set_qos(prefetch_count=sub.prefetch)
            queue = await declare_consumer_queue(
                channel, self._topology, sub.queue, sub.bindings, max_deliveries=sub.max_deliveries
            )
            await queue.consume(self._dispatch)
        except BaseException:
            await _close_quietly(channel)
            raise
        log.info("consumer.subscribed", queue=sub.queue, bindings=list(sub.bindings))
        self.subscribed.set()
        return channel

    async def _dispatch(self, message: AbstractIncomingMessage) -> None:
        # Called in delivery order; the lane keeps that order for the message's aggregate.
        self._acks.delivered(message)
        self._lanes[self._lane_of(message)].messages.put_nowait(message)

    def _lane_of(self, message: AbstractIncomingMessage) -> int:
        headers = message.headers or {}
        key = repr((headers.get("ce-aggregatetype"), headers.get("ce-aggregateid")))
        return zlib.crc32(key.encode()) % len(self._lanes)

    async def _drain(self, lane: _Lane) -> None:
        while True:
            batch = [await lane.messages.get()]
            while len(batch) < self.subscription.batch_size and not lane.messages.empty():
                batch.append(lane.messages.get_nowait())
            await self._handle_batch(batch)

    async def _handle_batch(self, batch: list[AbstractIncomingMessage]) -> None:
        readable = [
            (message, event)
            for message in batch
            if (event := await self._decode_or_dead_letter(message)) is not None
        ]
        if len(readable) > 1:
            try:
                fresh = await self._apply_batch([event for _, event in readable])
            except Exception as exc:
                # One at a time instead: each message gets its own retries and verdict.
                log.info("consumer.batch_failed", size=len(readable), error=repr(exc))
            else:
                outcomes = [
                    (message, "applied" if fresh.pop(event.id, False) else "duplicate")
                    for message, event in readable
                ]
                await self._settle_all(outcomes)
                return
        for message, event in readable:
            await self._handle(message, event)

    async def _decode_or_dead_letter(self, message: AbstractIncomingMessage) -> Event | None:
        try:
            return decode_event(message)
        except Exception as exc:  # BadEnvelope, or anything else a malformed message raises
            error = str(exc) if isinstance(exc, BadEnvelope) else repr(exc)
            log.error("consumer.unreadable", message_id=message.message_id, error=error)
            await self._settle(message, "dead_lettered")
            return None

    async def _apply_batch(self, events: list[Event]) -> dict[str, bool]:
        """Apply the new ones among ``events`` in one transaction; their ids -> True."""
        sub = self.subscription
        with consuming_batch_span(events, queue=sub.queue):  # linked to each event's trace
            if sub.batch_statement is not None:
                return await self._apply_statement(sub.batch_statement, events)
            async with self._db.pool.acquire() as conn, conn.transaction():
                fresh = await self._record_in_inbox(conn, events)
                new = _first_copies(events, fresh)
                if sub.batch_handler is not None:
                    await sub.batch_handler(conn, new)
                else:
                    for event in new:
                        await sub.handler(conn, event)
            return fresh

    async def _apply_statement(
        self, statement: BatchStatement, events: list[Event]
    ) -> dict[str, bool]:
        # One statement is one transaction: the inbox rows and the effects commit together.
        first: dict[str, Event] = {}
        for event in events:  # a copy the relay published twice: the first one counts
            first.setdefault(event.id, event)
        unique = list(first.values())
        sql, args = statement(unique)
        async with self._db.pool.acquire() as conn:
            rows = await conn.fetch(
                f"WITH fresh AS ({_INBOX_INSERT}), applied AS ({sql}) SELECT message_id FROM fresh",
                *self._inbox_args(unique),
                *args,
            )
        return {row["message_id"]: True for row in rows}

    def _inbox_args(self, events: Sequence[Event]) -> tuple[Any, ...]:
        return (
            self.subscription.queue,
            [e.id for e in events],
            [e.type for e in events],
            [e.source for e in events],
        )

    async def _handle(self, message: AbstractIncomingMessage, event: Event) -> None:
        attempt = _delivery_count(message)
        while True:
            attempt += 1
            try:
                applied = await self._apply(event)
            except Exception as exc:
                if await self._gave_up(message, event, exc, attempt=attempt):
                    return
                continue
            await self._settle(message, "applied" if applied else "duplicate", ack=True)
            return

    async def _apply(self, event: Event) -> bool:
        """Apply ``event`` once; waits out a database outage. False for a duplicate."""
        delay = 0.1
        while True:
            try:
                return await self._apply_once(event)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("consumer.database_unavailable", error=str(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)

    async def _apply_once(self, event: Event) -> bool:
        sub = self.subscription
        with consuming_span(event, queue=sub.queue):  # continues the event's stored trace
            if sub.batch_statement is not None:  # one round trip, no transaction
                return bool(await self._apply_statement(sub.batch_statement, [event]))
            async with self._db.pool.acquire() as conn, conn.transaction():
                if not await self._record_in_inbox(conn, [event]):
                    return False
                await sub.handler(conn, event)
            return True

    async def _record_in_inbox(self, conn: DbConn, events: Sequence[Event]) -> dict[str, bool]:
        """Inbox rows for ``events``; the ids not seen before -> True."""
        rows = await conn.fetch(_INBOX_INSERT, *self._inbox_args(events))
        return {row["message_id"]: True for row in rows}

    async def _gave_up(
        self, message: AbstractIncomingMessage, event: Event, exc: Exception, *, attempt: int
    ) -> bool:
        """Dead-letter after the last attempt (True), else wait before the next one."""
        sub = self.subscription
        fields = {"queue": sub.queue, "event_id": event.id, "attempt": attempt}
        if attempt >= sub.max_deliveries:
            log.error("consumer.dead_lettered", error=repr(exc), **fields)
            await self._settle(message, "dead_lettered")
            return True
        log.warning("consumer.handler_failed", error=repr(exc), **fields)
        self._count("retried")
        await asyncio.sleep(min(sub.retry_delay_max, sub.retry_delay * 2 ** (attempt - 1)))
        return False

    async def _settle(
        self, message: AbstractIncomingMessage, outcome: str, *, ack: bool = False
    ) -> None:
        try:
            if ack:
                await self._acks.settled(message)
            else:
                await self._acks.rejected(message)  # to the dead-letter exchange
        except Exception as exc:
            # The channel died with the message unsettled: the broker redelivers it, and the
            # inbox turns that into a duplicate.
            log.warning("consumer.settle_failed", outcome=outcome, error=str(exc))
            outcome = f"{outcome}_unsettled"
        self._count(outcome)

    async def _settle_all(self, outcomes: list[tuple[AbstractIncomingMessage, str]]) -> None:
        """Acknowledge a batch: one frame for it (and whatever settled before it)."""
        try:
            await self._acks.settled_all([message for message, _ in outcomes])
        except Exception as exc:  # the channel died: the broker redelivers, the inbox dedups
            log.warning("consumer.settle_failed", outcome="batch", error=str(exc))
            outcomes = [(message, f"{outcome}_unsettled") for message, outcome in outcomes]
        for _, outcome in outcomes:
            self._count(outcome)

    def _count(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        if self._metrics is not None:
            self._metrics.consumed.labels(self.subscription.queue, outcome).inc()


_INBOX_INSERT = (
    "INSERT INTO inbox (consumer, message_id, event_type, source)"
    " SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[])"
    " ON CONFLICT DO NOTHING RETURNING message_id"
)


def _first_copies(events: Sequence[Event], fresh: dict[str, bool]) -> list[Event]:
    # The same event twice in one batch (the relay published it twice): the first copy counts.
    seen: set[str] = set()
    new = []
    for event in events:
        if event.id in fresh and event.id not in seen:
            seen.add(event.id)
            new.append(event)
    return new


def _delivery_count(message: AbstractIncomingMessage) -> int:
    # Quorum queues count returns in x-delivery-count (absent on the first delivery).
    value = (message.headers or {}).get("x-delivery-count", 0)
    return value if isinstance(value, int) else 0


async def _close_quietly(channel: AbstractChannel) -> None:
    if not channel.is_closed:
        try:
            await channel.close()
        except Exception as exc:
            log.debug("consumer.channel_close_failed", error=str(exc))
