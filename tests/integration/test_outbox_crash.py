"""The relay as a child process, crashed or frozen at the worst moment: after the broker
confirmed a batch and before the rows are marked published.

* SIGKILL there: the rows stay unpublished, the next relay publishes them again, and the
  consumer applies each event once (the second copy is an inbox duplicate).
* SIGSTOP there past the election lease, with a second relay taking over: when the first one
  resumes, its marks are rejected by the fencing token; nothing is lost or applied twice.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from ordermesh_shared.coordination import Election
from ordermesh_shared.database import SHARED_MIGRATIONS, Database, DbConn
from ordermesh_shared.etcd_client import EtcdClient
from ordermesh_shared.messaging.broker import Broker
from ordermesh_shared.messaging.consumer import EventConsumer, Subscription
from ordermesh_shared.messaging.envelope import Event
from ordermesh_shared.outbox import add_event
from ordermesh_shared.outbox.relay import OutboxRelay, RelaySettings, SoleLeader
from ordermesh_shared.outbox.wiring import election_name, relay_fence

from tests.support.etcd import EtcdServer
from tests.support.procs import ChildProcess, python_child

pytestmark = pytest.mark.integration

SETTINGS = RelaySettings(batch_size=100, publish_timeout=2.0, poll_interval=0.2)
LEASE_TTL = 1.0  # seconds; the private etcd's minimum

# A relay that stalls after the broker's confirm of its first batch and says so. With
# --elected it campaigns on etcd and fences its marks, like a service instance.
CHILD_RELAY = """
import asyncio, sys
from ordermesh_shared.messaging.broker import Broker
from ordermesh_shared.coordination import Election
from ordermesh_shared.database import SHARED_MIGRATIONS, Database
from ordermesh_shared.etcd_client import EtcdClient
from ordermesh_shared.outbox.relay import OutboxRelay, RelaySettings, SoleLeader, no_fence
from ordermesh_shared.outbox.wiring import election_name, relay_fence

dsn, amqp_url, etcd_url, stall = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
stalled = False

async def after_confirm(events):
    global stalled
    if stalled or not events:
        return
    stalled = True
    print(f"confirmed {len(events)} not marked yet", flush=True)
    try:
        await asyncio.sleep(stall)  # SIGKILL or SIGSTOP lands here
    except asyncio.CancelledError:
        # The freeze hit after the relay last checked its leadership: carry on to the marks,
        # as a process that has not noticed anything would. Fencing must stop it there.
        print("cancelled while frozen; marking anyway", flush=True)

async def main():
    async with Database(dsn) as db, Broker(amqp_url) as broker:
        await db.migrate(SHARED_MIGRATIONS)
        settings = RelaySettings(batch_size=100, publish_timeout=2.0, poll_interval=0.2)
        if etcd_url == "-":
            relay = OutboxRelay(db, broker, service="shop", fence=no_fence, settings=settings,
                                after_confirm=after_confirm)
            await relay.run(SoleLeader())
        async with EtcdClient(etcd_url) as etcd:
            relay = OutboxRelay(db, broker, service="shop", fence=relay_fence("shop"),
                                settings=settings, after_confirm=after_confirm)
            await relay.run(Election(etcd, election_name("shop"), ttl=1.0, value="child"))

asyncio.run(main())
"""


async def apply_effect(conn: DbConn, event: Event) -> None:
    await conn.execute("INSERT INTO effects (event_id) VALUES ($1)", event.id)


@pytest.fixture
async def db(fresh_database: str) -> AsyncIterator[Database]:
    async with Database(fresh_database) as database:
        await database.migrate(SHARED_MIGRATIONS)
        async with database.pool.acquire() as conn:
            await conn.execute("CREATE TABLE effects (n bigserial PRIMARY KEY, event_id text)")
        yield database


@pytest.fixture
async def consumer(db: Database, broker: Broker) -> AsyncIterator[EventConsumer]:
    running = EventConsumer(db, broker, Subscription("shop.effects", ["shop.*"], apply_effect))
    task = asyncio.create_task(running.run())
    async with asyncio.timeout(10):
        await running.subscribed.wait()
    yield running
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def child_relay(
    tmp_path: Path, db: Database, amqp_url: str, *, etcd_url: str = "-", stall: float = 60.0
) -> ChildProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = (db.dsn, amqp_url, etcd_url, str(stall))
    return python_child(CHILD_RELAY, *args, log_path=tmp_path / "relay.log", env=env)


async def commit_events(db: Database, count: int, *, first: int = 0) -> list[uuid.UUID]:
    """``count`` events, one each for aggregates t<first>, t<first + 1>, ..."""
    ids = []
    for i in range(first, first + count):
        async with db.pool.acquire() as conn, conn.transaction():
            ids.append(
                await add_event(
                    conn,
                    aggregate_type="thing",
                    aggregate_id=f"t{i}",
                    event_type="updated",
                    payload={"n": i},
                )
            )
    return ids


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def scalar(db: Database, sql: str) -> Any:
    async with db.pool.acquire() as conn:
        return await conn.fetchval(sql)


async def applied_once(db: Database, ids: list[uuid.UUID]) -> None:
    """Each committed event published and applied exactly once."""
    await eventually(lambda: _all_published(db, len(ids)))
    await eventually(lambda: _effects_at_least(db, len(ids)))
    async with db.pool.acquire() as conn:
        rows = await conn.fetch("SELECT event_id, count(*) AS n FROM effects GROUP BY event_id")
    assert {r["event_id"]: r["n"] for r in rows} == {str(i): 1 for i in ids}


async def _all_published(db: Database, count: int) -> bool:
    published = await scalar(db, "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
    return bool(published == count)


async def _effects_at_least(db: Database, count: int) -> bool:
    return bool(await scalar(db, "SELECT count(*) FROM effects") >= count)


@asynccontextmanager
async def relaying(relay: OutboxRelay, leadership: Any) -> AsyncIterator[None]:
    task = asyncio.create_task(relay.run(leadership))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_relay_killed_between_confirm_and_mark_publishes_again(
    db: Database, broker: Broker, consumer: EventConsumer, rabbit_vhost: str, tmp_path: Path
) -> None:
    ids = await commit_events(db, 5)
    with child_relay(tmp_path, db, rabbit_vhost) as child:
        await child.wait_for_output("confirmed 5 not marked yet", timeout=15)
        child.kill()
    # The broker has the first copies (the consumer applies them); the rows say "unpublished".
    await eventually(lambda: _effects_at_least(db, 5))
    assert await scalar(db, "SELECT count(*) FROM outbox WHERE published_at IS NULL") == 5

    async with relaying(OutboxRelay(db, broker, service="shop", settings=SETTINGS), SoleLeader()):
        await applied_once(db, ids)
        await eventually(lambda: _counted(consumer, "duplicate", 5))
    assert consumer.counts.get("applied") == 5


async def _counted(consumer: EventConsumer, outcome: str, count: int) -> bool:
    return consumer.counts.get(outcome, 0) >= count


async def test_stale_relay_paused_past_its_lease_is_fenced(
    db: Database,
    broker: Broker,
    consumer: EventConsumer,
    rabbit_vhost: str,
    etcd_server: EtcdServer,
    tmp_path: Path,
) -> None:
    first = await commit_events(db, 5)
    with child_relay(tmp_path, db, rabbit_vhost, etcd_url=etcd_server.url, stall=2.0) as stale:
        await stale.wait_for_output("confirmed 5 not marked yet", timeout=15)
        stale.pause()  # frozen with its batch claimed (rows locked) and published, not marked
        async with EtcdClient(etcd_server.url) as etcd:
            election = Election(etcd, election_name("shop"), ttl=LEASE_TTL, value="test")
            relay = OutboxRelay(
                db, broker, service="shop", fence=relay_fence("shop"), settings=SETTINGS
            )
            async with relaying(relay, election):
                # The new leader relays what the frozen one has not locked...
                later = await commit_events(db, 3, first=5)
                # ...but not an event whose aggregate's earlier event the frozen one holds.
                behind = await commit_events(db, 1)
                await eventually(lambda: _all_published_of(db, later))
                assert not await _all_published_of(db, behind)
                stale.resume()
                # ...the stale one wakes up, marks, and is refused at the fence...
                await stale.wait_for_output("outbox.relay_fenced", timeout=15)
                # ...so its rows were rolled back, and the new leader publishes them again.
                await applied_once(db, first + later + behind)
    assert "StaleToken" in stale.output() or "rejected" in stale.output()
    assert consumer.counts.get("applied") == 9
    assert consumer.counts.get("duplicate") == 5  # the stale relay's copies
    async with db.pool.acquire() as conn:  # aggregate t0: its two events in commit order
        t0 = await conn.fetch(
            "SELECT event_id FROM effects WHERE event_id = ANY($1::text[]) ORDER BY n",
            [str(first[0]), str(behind[0])],
        )
    assert [r["event_id"] for r in t0] == [str(first[0]), str(behind[0])]


async def _all_published_of(db: Database, ids: list[uuid.UUID]) -> bool:
    async with db.pool.acquire() as conn:
        count = await conn.fetchval(
            "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL AND event_id = ANY($1)",
            ids,
        )
    return bool(count == len(ids))
