"""Outages while events flow: RabbitMQ stopped and started (a private node), Postgres
connections cut. Afterwards every committed event has been applied exactly once, compared row
by row with the outbox."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from ordermesh_shared.database import SHARED_MIGRATIONS, Database, DbConn
from ordermesh_shared.messaging.broker import Broker
from ordermesh_shared.messaging.consumer import EventConsumer, Subscription
from ordermesh_shared.messaging.envelope import Event
from ordermesh_shared.outbox import add_event
from ordermesh_shared.outbox.relay import OutboxRelay, RelaySettings, SoleLeader
from ordermesh_shared.outbox.store import Backoff

from tests.support.rabbitmq import PrivateRabbit
from tests.support.watchdog import stacks_printed_after

pytestmark = pytest.mark.integration

FAST = RelaySettings(
    batch_size=50,
    publish_timeout=1.0,
    poll_interval=0.3,
    retry=Backoff(base=0.05, cap=0.2, max_attempts=50),
    error_backoff_max=0.3,
)
SCHEMA = """
CREATE TABLE things (id text PRIMARY KEY, version integer NOT NULL);
CREATE TABLE effects (n bigserial PRIMARY KEY, event_id text NOT NULL, version integer NOT NULL);
"""
EVENTS = 300
RATE = 150.0  # events per second while the outage happens


async def apply_effect(conn: DbConn, event: Event) -> None:
    await conn.execute(
        "INSERT INTO effects (event_id, version) VALUES ($1, $2)", event.id, event.data["version"]
    )


@asynccontextmanager
async def background(coro: Awaitable[Any]) -> AsyncIterator[None]:
    task: asyncio.Future[Any] = asyncio.ensure_future(coro)
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@asynccontextmanager
async def event_flow(dsn: str, amqp_url: str) -> AsyncIterator[tuple[Database, EventConsumer]]:
    """A migrated database, a subscribed consumer and a running relay, all in this process."""
    async with Database(dsn, max_size=10) as db, Broker(amqp_url, name="test") as broker:
        await db.migrate(SHARED_MIGRATIONS)
        async with db.pool.acquire() as conn:
            await conn.execute(SCHEMA)
        subscription = Subscription("shop.effects", ["shop.*"], apply_effect, retry_delay=0.05)
        consumer = EventConsumer(db, broker, subscription)
        relay = OutboxRelay(db, broker, service="shop", settings=FAST)
        async with background(consumer.run()), background(relay.run(SoleLeader())):
            async with asyncio.timeout(15):
                await consumer.subscribed.wait()
            yield db, consumer


async def produce(dsn: str, *, count: int, rate: float) -> list[uuid.UUID]:
    """Commit ``count`` events over 20 aggregates at ``rate``/s on connections of its own."""
    ids: list[uuid.UUID] = []
    # Its own pool, named: the database-outage test cuts every connection but these.
    settings = {"application_name": "producer"}
    async with asyncpg.create_pool(dsn, min_size=1, max_size=2, server_settings=settings) as pool:
        for i in range(count):
            async with pool.acquire() as conn, conn.transaction():
                thing = f"t{i % 20}"
                version = await conn.fetchval(
                    "INSERT INTO things VALUES ($1, 1) ON CONFLICT (id)"
                    " DO UPDATE SET version = things.version + 1 RETURNING version",
                    thing,
                )
                ids.append(
                    await add_event(
                        conn,
                        aggregate_type="thing",
                        aggregate_id=thing,
                        event_type="updated",
                        payload={"version": version},
                    )
                )
            await asyncio.sleep(1 / rate)
    return ids


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.1)


async def assert_applied_exactly_once(db: Database, committed: list[uuid.UUID]) -> None:
    """Every outbox row was published, and applied once with its own payload."""

    async def all_applied_and_marked() -> bool:
        # A message can reach the consumer while its confirm is lost to the outage: the row
        # is marked only when the relay sends it again, which may come after the effect.
        async with db.pool.acquire() as conn:
            count: int = await conn.fetchval("SELECT count(DISTINCT event_id) FROM effects")
            waiting: int = await conn.fetchval(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL"
            )
        return count >= len(committed) and waiting == 0

    await eventually(all_applied_and_marked, timeout=40)
    async with db.pool.acquire() as conn:
        rows = await conn.fetch(
            """
            SELECT o.event_id::text AS event_id, (o.payload->>'version')::int AS version,
                   o.published_at IS NOT NULL AS published,
                   (SELECT count(*) FROM effects e WHERE e.event_id = o.event_id::text) AS applied,
                   (SELECT max(e.version) FROM effects e WHERE e.event_id = o.event_id::text)
                       AS applied_version,
                   (SELECT count(*) FROM inbox i WHERE i.message_id = o.event_id::text) AS inbox
              FROM outbox o ORDER BY o.id
            """
        )
        assert await conn.fetchval("SELECT count(*) FROM effects") == len(committed)
    assert [r["event_id"] for r in rows] == [str(i) for i in committed]
    for row in rows:
        assert (row["published"], row["applied"], row["inbox"]) == (True, 1, 1), dict(row)
        assert row["applied_version"] == row["version"], dict(row)


async def test_broker_stopped_while_events_flow(
    fresh_database: str, private_rabbit: PrivateRabbit
) -> None:
    # Reconnect quickly (aio-pika's default waits 5 s between attempts).
    url = f"{private_rabbit.url}?reconnect_interval=0.3"
    async with event_flow(fresh_database, url) as (db, consumer):
        producer = asyncio.create_task(produce(fresh_database, count=EVENTS, rate=RATE))
        await asyncio.sleep(0.6)
        await asyncio.to_thread(private_rabbit.stop)
        await asyncio.sleep(0.5)  # events keep committing while the broker is gone
        await asyncio.to_thread(private_rabbit.start)
        committed = await producer
        await assert_applied_exactly_once(db, committed)
    assert consumer.counts.get("dead_lettered", 0) == 0


async def test_database_connections_cut_while_events_flow(
    fresh_database: str, rabbit_vhost: str
) -> None:
    # It hung once in a full run (pytest-timeout's 120 s, after the three cuts): if it does
    # again, the output shows where each task was.
    async with (
        stacks_printed_after(80),
        event_flow(fresh_database, rabbit_vhost) as (db, consumer),
    ):
        producer = asyncio.create_task(produce(fresh_database, count=EVENTS, rate=RATE))
        for _ in range(3):  # what a Postgres restart does to the relay's and consumer's links
            await asyncio.sleep(0.4)
            await _cut_connections(fresh_database)
        committed = await producer
        await assert_applied_exactly_once(db, committed)
    # A commit cut off mid-way is ambiguous to the consumer: it retries, and the inbox says
    # "already applied". So "applied" may undercount; the effects table above is the truth.
    assert consumer.counts.get("dead_lettered", 0) == 0


async def _cut_connections(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            "   AND application_name <> 'producer'"
        )
    finally:
        await conn.close()
