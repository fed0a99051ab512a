"""The outbox relay against a real Postgres and RabbitMQ (a private vhost on the shared broker).

Events are written with ``add_event`` in business transactions that bump an aggregate's
version; a consumer applies each event into an ``effects`` table (no unique key there, so an
event applied twice would show) through the shared inbox.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from ordermesh_shared.database import SHARED_MIGRATIONS, Database, DbConn
from ordermesh_shared.messaging.broker import Broker
from ordermesh_shared.messaging.consumer import EventConsumer, Subscription
from ordermesh_shared.messaging.envelope import Event, OutgoingEvent
from ordermesh_shared.messaging.publisher import BatchOutcome
from ordermesh_shared.messaging.topology import Topology, declare_consumer_queue
from ordermesh_shared.outbox import NotInTransaction, add_event
from ordermesh_shared.outbox import relay as relay_module
from ordermesh_shared.outbox.relay import OutboxRelay, RelaySettings, SoleLeader
from ordermesh_shared.outbox.store import (
    CLAIM_SQL,
    NOTIFY_CHANNEL,
    PRUNE_SQL,
    RECORD_FAILURES_SQL,
    Backoff,
    Claim,
    claim_batch,
    list_quarantined,
    redrive,
)
from ordermesh_shared.tracing import Tracing

pytestmark = pytest.mark.integration

SERVICE = "shop"
FAST = RelaySettings(
    batch_size=50,
    publish_timeout=2.0,
    poll_interval=0.5,
    retry=Backoff(base=0.05, cap=0.2, max_attempts=3),
    error_backoff_max=0.3,
)
SCHEMA = """
CREATE TABLE things (id text PRIMARY KEY, version integer NOT NULL);
CREATE TABLE effects (
    n bigserial PRIMARY KEY, event_id text NOT NULL, aggregate_id text NOT NULL,
    version integer NOT NULL, event_type text NOT NULL);
"""


@pytest.fixture
async def db(fresh_database: str) -> AsyncIterator[Database]:
    async with Database(fresh_database, max_size=8) as database:
        await database.migrate(SHARED_MIGRATIONS)
        async with database.pool.acquire() as conn:
            await conn.execute(SCHEMA)
        yield database


async def commit_event(db: Database, thing: str, event_type: str = "updated") -> uuid.UUID:
    """A business transaction: bump the thing's version (locking it), record the event."""
    async with db.pool.acquire() as conn, conn.transaction():
        version = await conn.fetchval(
            "INSERT INTO things VALUES ($1, 1) ON CONFLICT (id)"
            " DO UPDATE SET version = things.version + 1 RETURNING version",
            thing,
        )
        return await add_event(
            conn,
            aggregate_type="thing",
            aggregate_id=thing,
            event_type=event_type,
            payload={"version": version},
        )


async def apply_effect(conn: DbConn, event: Event) -> None:
    await conn.execute(
        "INSERT INTO effects (event_id, aggregate_id, version, event_type) VALUES ($1, $2, $3, $4)",
        event.id,
        event.aggregate_id,
        event.data["version"],
        event.event_type,
    )


@asynccontextmanager
async def background(coro: Awaitable[Any]) -> AsyncIterator[asyncio.Task[Any]]:
    task: asyncio.Task[Any] = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def effects(db: Database) -> list[asyncpg.Record]:
    async with db.pool.acquire() as conn:
        return await conn.fetch("SELECT event_id, aggregate_id, version FROM effects ORDER BY n")


async def unpublished(db: Database) -> int:
    async with db.pool.acquire() as conn:
        count: int = await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        return count


def relay_for(db: Database, broker: Broker, **kwargs: Any) -> OutboxRelay:
    return OutboxRelay(db, broker, service=SERVICE, settings=FAST, **kwargs)


@asynccontextmanager
async def consuming(
    db: Database, broker: Broker, bindings: list[str] | None = None
) -> AsyncIterator[EventConsumer]:
    """A consumer applying effects, subscribed (its queue bound) before the block starts."""
    subscription = Subscription("shop.effects", bindings or ["shop.*"], apply_effect)
    consumer = EventConsumer(db, broker, subscription)
    async with background(consumer.run()):
        async with asyncio.timeout(10):
            await consumer.subscribed.wait()
        yield consumer


async def test_rolled_back_transaction_emits_nothing(db: Database, broker: Broker) -> None:
    async with consuming(db, broker), background(relay_for(db, broker).run(SoleLeader())):
        with pytest.raises(RuntimeError, match="business rule"):
            await add_then_fail(db)
        # The rolled-back event's own aggregate: had that event gone out, it would have been
        # applied first (one aggregate, one lane, in order), so the first effect tells.
        committed = await commit_event(db, "t1")
        await eventually(lambda: _has_effects(db, 1))
    assert [r["event_id"] for r in await effects(db)] == [str(committed)]
    async with db.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 1


async def add_then_fail(db: Database) -> None:
    """A business transaction that records an event, then breaks a rule and rolls back."""
    async with db.pool.acquire() as conn, conn.transaction():
        await add_event(
            conn, aggregate_type="thing", aggregate_id="t1", event_type="updated", payload={}
        )
        raise RuntimeError("business rule broken: roll back")


async def test_add_event_outside_a_transaction_is_refused(db: Database) -> None:
    async with db.pool.acquire() as conn:
        with pytest.raises(NotInTransaction):
            await add_event(
                conn, aggregate_type="thing", aggregate_id="t1", event_type="updated", payload={}
            )
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 0


async def _has_effects(db: Database, count: int) -> bool:
    return len(await effects(db)) >= count


async def _all_marked(db: Database) -> bool:
    return await unpublished(db) == 0


async def test_message_carries_the_cloudevents_envelope(
    db: Database, broker: Broker, rabbit_vhost: str
) -> None:
    channel = await broker.connection.channel()
    queue = await declare_consumer_queue(channel, Topology(), "raw", ["shop.#"])
    event_id = await commit_event(db, "t1", "created")
    async with background(relay_for(db, broker).run(SoleLeader())):
        message = await _get_one(queue)
    await channel.close()
    assert message.message_id == str(event_id)
    assert message.routing_key == "shop.created"
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.headers["ce-id"] == str(event_id)
    assert message.headers["ce-type"] == "ordermesh.shop.created"
    assert message.headers["ce-source"] == "/ordermesh/shop"
    assert message.headers["ce-subject"] == "thing/t1"
    assert message.headers["ce-specversion"] == "1.0"
    assert message.body == b'{"version":1}'


async def _get_one(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    async with asyncio.timeout(10):
        while True:
            message = await queue.get(fail=False, no_ack=True)
            if message is not None:
                return message
            await asyncio.sleep(0.05)


async def test_poison_row_is_quarantined_while_the_rest_flow(db: Database, broker: Broker) -> None:
    # Nothing is bound to "shop.unroutable": with mandatory the broker returns it every time.
    relay = relay_for(db, broker)
    async with consuming(db, broker, ["shop.updated"]), background(relay.run(SoleLeader())):
        await commit_event(db, "a", "updated")
        poison = await commit_event(db, "a", "unroutable")
        held = await commit_event(db, "a", "updated")  # must wait behind the poison row
        others = [await commit_event(db, f"b{i}") for i in range(20)]
        await eventually(lambda: _has_effects(db, 21))
        await eventually(lambda: _any_quarantined(db))
        quarantined = await _quarantined(db)
        assert [q.event_id for q in quarantined] == [poison]
        assert quarantined[0].attempts == FAST.retry.max_attempts
        assert "NO_ROUTE" in (quarantined[0].last_error or "")
        assert quarantined[0].held_behind == 1
        applied = {r["event_id"] for r in await effects(db)}
        assert set(map(str, others)) <= applied
        assert str(held) not in applied

        await _bind(broker, "shop.effects", "shop.unroutable")  # the operator fixes the cause
        async with db.pool.acquire() as conn:
            assert await redrive(conn) == [poison]
        await eventually(lambda: _has_effects(db, 23))
        await eventually(lambda: _all_marked(db))  # marks commit after the confirms
    versions = [r["version"] for r in await effects(db) if r["aggregate_id"] == "a"]
    assert versions == [1, 2, 3]  # the held event came after the re-driven one
    assert await unpublished(db) == 0


async def _quarantined(db: Database) -> list[Any]:
    async with db.pool.acquire() as conn:
        return list(await list_quarantined(conn))


async def _any_quarantined(db: Database) -> bool:
    return bool(await _quarantined(db))


async def _bind(broker: Broker, queue_name: str, routing_key: str) -> None:
    channel = await broker.connection.channel()
    queue = await channel.get_queue(queue_name)
    await queue.bind(Topology().events_exchange, routing_key)
    await channel.close()


async def test_concurrent_aggregates_arrive_in_commit_order(db: Database, broker: Broker) -> None:
    things = [f"t{i}" for i in range(30)]
    rng = random.Random(5)

    async def writer(count: int) -> None:
        for _ in range(count):
            await commit_event(db, rng.choice(things))

    async with consuming(db, broker), background(relay_for(db, broker).run(SoleLeader())):
        await asyncio.gather(*(writer(40) for _ in range(10)))
        await eventually(lambda: _has_effects(db, 400), timeout=30)
    seen: dict[str, list[int]] = {}
    for row in await effects(db):
        seen.setdefault(row["aggregate_id"], []).append(row["version"])
    for thing, versions in seen.items():
        assert versions == list(range(1, len(versions) + 1)), f"{thing} out of order: {versions}"
    assert sum(len(v) for v in seen.values()) == 400


async def test_event_committed_without_notify_is_found_by_the_poll(
    db: Database, broker: Broker
) -> None:
    async with consuming(db, broker), background(relay_for(db, broker).run(SoleLeader())):
        await asyncio.sleep(0.2)  # the relay is idle, waiting for a NOTIFY or its poll
        async with db.pool.acquire() as conn, conn.transaction():
            quiet = await add_event(
                conn,
                aggregate_type="thing",
                aggregate_id="q",
                event_type="updated",
                payload={"version": 1},
                notify=False,
            )
        async with asyncio.timeout(FAST.poll_interval * 4):
            while not await _has_effects(db, 1):
                await asyncio.sleep(0.05)
    assert [r["event_id"] for r in await effects(db)] == [str(quiet)]


async def test_events_committed_during_a_batch_are_not_left_for_the_poll(
    db: Database, broker: Broker
) -> None:
    # Wake-ups for rows a batch already claimed are skipped; one for a row committed after
    # the batch's claim must still start a batch. With the poll an hour away, only the
    # notifications can have relayed every event within the deadline below.
    rng = random.Random(11)
    settings = replace(FAST, poll_interval=3600.0)
    relay = OutboxRelay(db, broker, service=SERVICE, settings=settings)

    async def writer() -> None:
        for _ in range(40):
            await commit_event(db, f"t{rng.randrange(20)}")
            await asyncio.sleep(rng.uniform(0, 0.01))

    async with consuming(db, broker), background(relay.run(SoleLeader())):
        await asyncio.sleep(0.2)  # leading and listening
        await asyncio.gather(*(writer() for _ in range(6)))
        await eventually(lambda: _has_effects(db, 240), timeout=20)
        await eventually(lambda: _all_marked(db))
    assert await unpublished(db) == 0


async def test_a_row_held_by_a_stale_relay_is_not_overtaken(db: Database, broker: Broker) -> None:
    # A relay paused mid-batch (its lease gone) still holds its claimed rows: the new leader
    # skips them, and must skip the later events of their aggregates too.
    first = await commit_event(db, "a")
    await commit_event(db, "a")
    await commit_event(db, "b")
    relay = relay_for(db, broker)
    async with consuming(db, broker):
        stale = await asyncpg.connect(db.dsn)
        try:
            async with stale.transaction():
                await stale.execute("SELECT 1 FROM outbox WHERE event_id = $1 FOR UPDATE", first)
                held = await relay.relay_batch(token=1)
            resumed = await relay.relay_batch(token=1)  # the stale relay's batch rolled back
        finally:
            await stale.close()
        await eventually(lambda: _has_effects(db, 3))
    assert (held.claimed, held.published) == (1, 1)  # b's event only
    assert (resumed.claimed, resumed.published) == (2, 2)
    applied = [(r["aggregate_id"], r["version"]) for r in await effects(db)]
    assert [v for a, v in applied if a == "a"] == [1, 2]
    assert await unpublished(db) == 0


async def test_claim_planned_on_an_empty_outbox_stays_cheap_on_a_backlog(db: Database) -> None:
    # The relay's first claim usually meets an empty outbox, and a prepared statement keeps
    # its plan. That plan must still probe each aggregate by index when a backlog builds up,
    # not scan every unpublished row once per claimed row. Buffers touched, unlike time,
    # do not depend on how busy the machine is.
    plan = await _plan_made_empty_run_full(db, CLAIM_SQL, "500")
    assert plan["Actual Rows"] == 500
    buffers = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
    assert buffers < 20 * 500, f"{buffers} buffers for a 500-row claim"


async def test_failure_and_prune_statements_planned_empty_stay_cheap(db: Database) -> None:
    # The same trap: a burst of failed publishes is typical at start-up (queues not bound
    # yet), and the prune runs from the first batch on, both while the outbox is small.
    failures = await _plan_made_empty_run_full(
        db, RECORD_FAILURES_SQL, "ARRAY[3001, 3002]::bigint[], ARRAY['x', 'y'], 0.05, 60, 5"
    )
    assert failures["Actual Rows"] == 2
    nothing_due = await _plan_made_empty_run_full(db, PRUNE_SQL, "604800, 5000")
    for plan in (failures, nothing_due):
        buffers = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
        assert buffers < 100, f"{buffers} buffers (the outbox has 6,000 rows)"


async def _plan_made_empty_run_full(db: Database, sql: str, args: str) -> dict[str, Any]:
    """EXPLAIN ANALYZE of ``sql`` with the generic plan made while the outbox was empty,
    run on 6,000 rows (3,000 published a moment ago, 3,000 waiting). Rolled back."""
    async with db.pool.acquire() as conn:
        try:
            async with conn.transaction():
                await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                await conn.execute(f"PREPARE stmt AS {sql}")
                await conn.execute(f"EXPLAIN ANALYZE EXECUTE stmt({args})")  # planned: empty
                await conn.execute(
                    "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type,"
                    " payload) SELECT gen_random_uuid(), 'thing', 't' || (i % 1000), 'updated',"
                    " '{}' FROM generate_series(1, 6000) i"
                )
                await conn.execute("UPDATE outbox SET published_at = now() WHERE id <= 3000")
                plan = await conn.fetchval(
                    f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE stmt({args})"
                )
                raise _RollBack
        except _RollBack:
            pass
        finally:
            await conn.execute("DEALLOCATE ALL")  # prepared statements outlive a rollback
    top: dict[str, Any] = orjson.loads(plan)[0]["Plan"]
    return top


class _RollBack(Exception):
    pass


class HoldTheFirstBatch:
    """An ``after_confirm`` hook: the relay's first batch stops after its confirms (before
    its marks) until ``release`` is set; ``confirmed`` is set once it got there."""

    def __init__(self) -> None:
        self.confirmed = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, events: Sequence[OutgoingEvent]) -> None:
        if not self.confirmed.is_set():
            self.confirmed.set()
            await self.release.wait()


async def test_pipelined_batches_keep_each_aggregate_in_order(db: Database, broker: Broker) -> None:
    # Two batches in flight: while the first waits (here: held after its confirms), the
    # second claims. An aggregate's next event must wait behind the first batch's event,
    # then go as soon as that batch ends - not at the poll, an hour away - while other
    # aggregates' events are not held up at all.
    hold = HoldTheFirstBatch()
    settings = replace(FAST, poll_interval=3600.0, pipeline=2)
    relay = OutboxRelay(db, broker, service=SERVICE, settings=settings, after_confirm=hold)
    async with consuming(db, broker), background(relay.run(SoleLeader())):
        await commit_event(db, "a")
        async with asyncio.timeout(10):
            await hold.confirmed.wait()
        await commit_event(db, "a")  # behind the first batch's row
        await commit_event(db, "b")
        await eventually(lambda: _has_effects(db, 2))  # a1 (confirmed) and b1
        await asyncio.sleep(0.3)
        assert sorted(r["aggregate_id"] for r in await effects(db)) == ["a", "b"]
        hold.release.set()
        await eventually(lambda: _has_effects(db, 3), timeout=5)
        await eventually(lambda: _all_marked(db))
    applied = [(r["aggregate_id"], r["version"]) for r in await effects(db)]
    assert [v for a, v in applied if a == "a"] == [1, 2]
    assert await unpublished(db) == 0


def counting_claims(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(events, held) of every claim the relay makes from now on."""
    claims: list[tuple[int, int]] = []

    async def counting(conn: DbConn, *, limit: int) -> Claim:
        claim = await claim_batch(conn, limit=limit)
        claims.append((len(claim.events), len(claim.held)))
        return claim

    monkeypatch.setattr(relay_module, "claim_batch", counting)
    return claims


async def test_no_claim_after_claim_while_a_full_batch_waits_behind_the_other(
    db: Database, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 20 events of one aggregate, batches of 5: while the first batch is held after its
    # confirms, the next claim holds 5 rows behind it. Claiming those again and again until
    # the first batch ends would be a busy loop (a full claim that publishes nothing).
    claims = counting_claims(monkeypatch)
    hold = HoldTheFirstBatch()
    for _ in range(20):
        await commit_event(db, "a")
    settings = replace(FAST, batch_size=5, poll_interval=3600.0, pipeline=2)
    relay = OutboxRelay(db, broker, service=SERVICE, settings=settings, after_confirm=hold)
    async with consuming(db, broker), background(relay.run(SoleLeader())):
        async with asyncio.timeout(10):
            await hold.confirmed.wait()
        before = len(claims)
        await asyncio.sleep(1.0)
        during = claims[before:]
        hold.release.set()
        await eventually(lambda: _has_effects(db, 20), timeout=10)
    assert len(during) <= 2, f"{len(during)} claims in 1 s behind a held batch"
    assert [r["version"] for r in await effects(db)] == list(range(1, 21))


@pytest.mark.parametrize("pipeline", [1, 2])
async def test_no_claim_after_claim_behind_a_stale_relay(
    db: Database, broker: Broker, monkeypatch: pytest.MonkeyPatch, pipeline: int
) -> None:
    claims = counting_claims(monkeypatch)
    for _ in range(20):
        await commit_event(db, "a")
    settings = replace(FAST, batch_size=5, poll_interval=3600.0, pipeline=pipeline)
    relay = OutboxRelay(db, broker, service=SERVICE, settings=settings)
    async with db.pool.acquire() as stale, stale.transaction():
        await stale.execute("SELECT 1 FROM outbox ORDER BY id LIMIT 5 FOR UPDATE")
        async with consuming(db, broker), background(relay.run(SoleLeader())):
            await asyncio.sleep(1.0)
    assert 1 <= len(claims) <= 3, f"{len(claims)} claims in 1 s behind a stale relay"
    assert not await effects(db)  # all 20 wait behind the stale relay's rows


class _OneBadBatch:
    """The relay's first batch goes wrong (``kind``: the broker is out, or the broker
    refuses every event); later batches publish for real."""

    def __init__(self, relay: OutboxRelay, kind: str) -> None:
        self._real = relay._publisher.publish
        self._kind = kind
        self._done = False
        relay._publisher.publish = self.publish  # type: ignore[method-assign]

    async def publish(self, events: Sequence[OutgoingEvent]) -> BatchOutcome:
        if self._done:
            return await self._real(events)
        self._done = True
        if self._kind == "outage":
            return BatchOutcome(held=list(events), outage=TimeoutError("injected"))
        return BatchOutcome(failed=[(e, RuntimeError("injected nack")) for e in events])


@pytest.mark.parametrize("pipeline", [1, 2])
@pytest.mark.parametrize("kind", ["outage", "failed"])
async def test_a_bad_batch_is_retried_after_its_backoff_not_at_the_poll(
    db: Database, broker: Broker, pipeline: int, kind: str
) -> None:
    # While one worker backs off, the other waits for work: it must be woken for the retry.
    settings = replace(FAST, poll_interval=3600.0, pipeline=pipeline)
    relay = OutboxRelay(db, broker, service=SERVICE, settings=settings)
    _OneBadBatch(relay, kind)
    async with consuming(db, broker), background(relay.run(SoleLeader())):
        await asyncio.sleep(0.3)  # the workers are idle
        await commit_event(db, "a")
        await eventually(lambda: _has_effects(db, 1), timeout=5)
        await eventually(lambda: _all_marked(db))
    assert await unpublished(db) == 0


async def commit_and_ring(db: Database, thing: str) -> None:
    """A writer of this process: NOTIFY only when no relay here leads, ring after commit."""
    async with db.pool.acquire() as conn, conn.transaction():
        await add_event(
            conn,
            aggregate_type="thing",
            aggregate_id=thing,
            event_type="updated",
            payload={"version": 1},
            notify=db.bell.notify_others,
        )
    db.bell.ring()


@asynccontextmanager
async def counting_notifications(db: Database) -> AsyncIterator[list[str]]:
    heard: list[str] = []
    conn = await asyncpg.connect(db.dsn)
    try:
        await conn.add_listener(NOTIFY_CHANNEL, lambda *args: heard.append(str(args[-1])))
        yield heard
    finally:
        await conn.close()


async def test_the_relay_here_is_woken_by_the_bell_not_by_notify(
    db: Database, broker: Broker
) -> None:
    # The poll an hour away: only the bell can have woken the relay in time; and while it
    # leads, this process's writes send no NOTIFY (committed one at a time, server-wide).
    relay = OutboxRelay(db, broker, service=SERVICE, settings=replace(FAST, poll_interval=3600))
    assert db.bell.notify_others  # no relay here yet
    async with counting_notifications(db) as heard, consuming(db, broker):
        async with background(relay.run(SoleLeader())):
            await eventually(lambda: _leading(db))
            for i in range(20):
                await commit_and_ring(db, f"b{i % 4}")
                await asyncio.sleep(0.01)
            await eventually(lambda: _has_effects(db, 20), timeout=5)
        assert db.bell.notify_others  # stepped down: writers notify again
        await asyncio.sleep(0.1)  # a NOTIFY sent would have arrived by now
    assert heard == []


async def _leading(db: Database) -> bool:
    return not db.bell.notify_others


async def test_under_load_a_batch_gathers_the_events_of_its_linger(
    db: Database, broker: Broker
) -> None:
    # 60 events, one every ~5 ms: without the linger each woke a batch of its own.
    batches: list[int] = []

    async def count_batch(events: Sequence[OutgoingEvent]) -> None:
        batches.append(len(events))

    settings = replace(FAST, poll_interval=3600, linger=0.05)
    relay = OutboxRelay(db, broker, service=SERVICE, settings=settings, after_confirm=count_batch)
    async with consuming(db, broker), background(relay.run(SoleLeader())):
        await eventually(lambda: _leading(db))
        for i in range(60):
            await commit_and_ring(db, f"l{i % 6}")
            await asyncio.sleep(0.005)
        await eventually(lambda: _has_effects(db, 60), timeout=10)
    assert sum(batches) == 60
    assert len(batches) <= 15, batches  # ~0.4 s of writes / 0.05 s linger, and some slack


async def test_a_consumer_continues_the_trace_the_event_was_written_in(
    db: Database, broker: Broker
) -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing(service=SERVICE, instance_id="t-1", exporter=exporter, batch=False)
    async with tracing, consuming(db, broker), background(relay_for(db, broker).run(SoleLeader())):
        with tracing.tracer("test").start_as_current_span("write") as write:
            await commit_event(db, "traced")  # add_event stores the current traceparent
        await eventually(lambda: _has_effects(db, 1))
        await asyncio.sleep(0.1)  # the consumer's span ends after its commit
    spans = exporter.get_finished_spans()
    trace_id = write.get_span_context().trace_id
    consumed = [s for s in spans if s.kind == SpanKind.CONSUMER]
    published = [s for s in spans if s.kind == SpanKind.PRODUCER]
    assert consumed
    assert {s.context.trace_id for s in consumed if s.context} == {trace_id}
    batches = [s for s in published if s.name == "publish ordermesh.events"]
    sends = [s for s in published if s.name == "send ordermesh.events"]
    # The relay's batch: a trace of its own, linked to the event's...
    assert any(link.context.trace_id == trace_id for s in batches for link in s.links)
    # ...and in the event's trace, its send, linked to the batch.
    assert [s.context.trace_id for s in sends if s.context] == [trace_id]
