"""Retention: rows past their table's retention are pruned in batches, everything else stays
(the steps of running and parked sagas above all), and the loop outlives a database restart."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from order.app import MIGRATIONS as ORDER_MIGRATIONS
from ordermesh_shared.config import ServiceSettings
from ordermesh_shared.database import SHARED_MIGRATIONS, Database, DbConn, MigrationSet
from ordermesh_shared.metrics import Metrics
from ordermesh_shared.retention import DAY, Pruner, PruneRule, retention_rules
from ordermesh_shared.saga import SAGA_MIGRATIONS
from payment.app import SPEC as PAYMENT
from payment.app import PaymentSettings
from pydantic import ValidationError

from tests.support.apps import running, wait_ready
from tests.support.fakes import InMemoryRegistry
from tests.support.pg_proxy import PgProxy

pytestmark = pytest.mark.integration

ORDER_SETS = (SHARED_MIGRATIONS, SAGA_MIGRATIONS, MigrationSet("service", ORDER_MIGRATIONS))
# With the default retentions (7 days for keys and inbox, 30 for history): past every one,
# and within every one.
OLD, RECENT = 40 * DAY, 5 * DAY


@pytest.fixture
async def order_db(fresh_database: str) -> AsyncIterator[Database]:
    """A database with the order service's tables (shared, saga, timeline)."""
    async with Database(fresh_database) as db:
        await db.migrate(*ORDER_SETS)
        yield db


async def add_key(conn: DbConn, *, age: float) -> str:
    key = f"order/{uuid.uuid4()}:reserve"
    await conn.execute(
        "INSERT INTO idempotency_keys (key, request_hash, status_code, response, created_at)"
        " VALUES ($1, 'h', 200, '{}', now() - make_interval(secs => $2))",
        key,
        age,
    )
    return key


async def add_inbox(conn: DbConn, *, age: float) -> str:
    message_id = str(uuid.uuid4())
    await conn.execute(
        "INSERT INTO inbox (consumer, message_id, event_type, source, received_at)"
        " VALUES ('timeline', $1, 'order_placed', 'order', now() - make_interval(secs => $2))",
        message_id,
        age,
    )
    return message_id


async def add_timeline(conn: DbConn, *, age: float) -> str:
    event_id = str(uuid.uuid4())
    await conn.execute(
        "INSERT INTO order_timeline (event_id, order_id, service, event_type, aggregate_type,"
        " sequence, received_at, data) VALUES ($1, $2, 'order', 'order_placed', 'order', 1,"
        " now() - make_interval(secs => $3), '{}')",
        event_id,
        uuid.uuid4(),
        age,
    )
    return event_id


async def add_saga(
    conn: DbConn, *, status: str, age: float, steps_age: float | None = None
) -> uuid.UUID:
    """A saga last updated ``age`` seconds ago, with two steps started ``steps_age`` ago."""
    saga_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO sagas (id, name, status, input, created_at, updated_at)"
        " VALUES ($1, 'place_order', $2, $3, now() - make_interval(secs => $4),"
        " now() - make_interval(secs => $4))",
        saga_id,
        status,
        json.dumps({}),
        age,
    )
    for position, step in enumerate(("reserve_stock", "charge_payment")):
        await conn.execute(
            "INSERT INTO saga_steps (saga_id, step, direction, position, status, started_at)"
            " VALUES ($1, $2, 'forward', $3, 'succeeded', now() - make_interval(secs => $4))",
            saga_id,
            step,
            position,
            steps_age if steps_age is not None else age,
        )
    return saga_id


async def steps_of(conn: DbConn, saga_id: uuid.UUID) -> int:
    count: int = await conn.fetchval("SELECT count(*) FROM saga_steps WHERE saga_id = $1", saga_id)
    return count


async def keys(conn: DbConn, table: str, column: str) -> set[str]:
    return {r[0] for r in await conn.fetch(f"SELECT {column}::text FROM {table}")}


async def test_rows_past_retention_are_pruned_and_recent_ones_kept(order_db: Database) -> None:
    async with order_db.pool.acquire() as conn:
        await add_key(conn, age=OLD)
        await add_inbox(conn, age=OLD)
        await add_timeline(conn, age=OLD)
        recent_key = await add_key(conn, age=RECENT)
        recent_message = await add_inbox(conn, age=RECENT)
        recent_event = await add_timeline(conn, age=RECENT)
        finished = await add_saga(conn, status="completed", age=OLD)
        recent_saga = await add_saga(conn, status="cancelled", age=RECENT)
    metrics = Metrics(service="order")
    pruner = Pruner(order_db, retention_rules(ServiceSettings()), pruned=metrics.pruned_rows)

    counts = await pruner.prune_once()

    assert counts == {"idempotency_keys": 1, "inbox": 1, "order_timeline": 1, "saga_steps": 2}
    async with order_db.pool.acquire() as conn:
        assert await keys(conn, "idempotency_keys", "key") == {recent_key}
        assert await keys(conn, "inbox", "message_id") == {recent_message}
        assert await keys(conn, "order_timeline", "event_id") == {recent_event}
        assert await steps_of(conn, finished) == 0
        assert await steps_of(conn, recent_saga) == 2
        # The saga rows themselves stay (orders refer to them); only their step log goes.
        assert await conn.fetchval("SELECT count(*) FROM sagas") == 2
    sample = metrics.registry.get_sample_value
    assert sample("retention_pruned_rows_total", {"table": "saga_steps"}) == 2
    assert sample("retention_pruned_rows_total", {"table": "inbox"}) == 1


@pytest.mark.parametrize("status", ["running", "compensating", "compensation_failed"])
async def test_steps_of_unfinished_or_parked_sagas_are_kept_however_old(
    order_db: Database, status: str
) -> None:
    async with order_db.pool.acquire() as conn:
        unfinished = await add_saga(conn, status=status, age=OLD)
    pruner = Pruner(order_db, [PruneRule.finished_saga_steps(keep_for=DAY)])

    assert await pruner.prune_once() == {"saga_steps": 0}
    async with order_db.pool.acquire() as conn:
        assert await steps_of(conn, unfinished) == 2


async def test_a_saga_that_ended_recently_keeps_its_old_steps(order_db: Database) -> None:
    # A saga retried for a long time (say, an undo through an outage) ends long after its
    # steps started: retention counts from its end.
    async with order_db.pool.acquire() as conn:
        late = await add_saga(conn, status="cancelled", age=RECENT, steps_age=OLD)
    pruner = Pruner(order_db, [PruneRule.finished_saga_steps(keep_for=7 * DAY)])

    await pruner.prune_once()
    async with order_db.pool.acquire() as conn:
        assert await steps_of(conn, late) == 2


async def test_a_backlog_goes_in_bounded_batches_until_none_is_full(order_db: Database) -> None:
    async with order_db.pool.acquire() as conn:
        for _ in range(23):
            await add_inbox(conn, age=OLD)
        recent = await add_inbox(conn, age=RECENT)
    pruner = Pruner(order_db, [PruneRule.by_age("inbox", "received_at", keep_for=7 * DAY)], batch=5)

    assert await pruner.prune_once() == {"inbox": 23}
    async with order_db.pool.acquire() as conn:
        assert await keys(conn, "inbox", "message_id") == {recent}


async def test_a_batch_skips_rows_locked_by_another_replica(order_db: Database) -> None:
    async with order_db.pool.acquire() as conn:
        locked = await add_inbox(conn, age=OLD)
        await add_inbox(conn, age=OLD)
    pruner = Pruner(order_db, [PruneRule.by_age("inbox", "received_at", keep_for=DAY)])
    async with order_db.pool.acquire() as other, other.transaction():
        await other.execute("SELECT 1 FROM inbox WHERE message_id = $1 FOR UPDATE", locked)
        # Not blocked by the other replica's lock: it takes what is free and moves on.
        async with asyncio.timeout(5):
            assert await pruner.prune_once() == {"inbox": 1}
    async with order_db.pool.acquire() as conn:
        assert await keys(conn, "inbox", "message_id") == {locked}


async def test_a_retention_of_zero_keeps_everything(order_db: Database) -> None:
    settings = ServiceSettings(
        idempotency_retention_days=0, inbox_retention_days=0, history_retention_days=0
    )
    async with order_db.pool.acquire() as conn:
        await add_key(conn, age=OLD * 10)
        await add_inbox(conn, age=OLD * 10)
        await add_timeline(conn, age=OLD * 10)
        saga = await add_saga(conn, status="completed", age=OLD * 10)

    assert await Pruner(order_db, retention_rules(settings)).prune_once() == {}
    async with order_db.pool.acquire() as conn:
        for table in ("idempotency_keys", "inbox", "order_timeline"):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 1, table
        assert await steps_of(conn, saga) == 2


async def test_a_service_prunes_only_the_tables_it_has(fresh_database: str) -> None:
    async with Database(fresh_database) as db:
        await db.migrate(SHARED_MIGRATIONS)  # a participant: no timeline, no saga tables
        async with db.pool.acquire() as conn:
            await add_inbox(conn, age=OLD)
        counts = await Pruner(db, retention_rules(ServiceSettings())).prune_once()
    assert counts == {"idempotency_keys": 0, "inbox": 1}


async def test_the_loop_outlives_a_database_restart(fresh_database: str) -> None:
    async with PgProxy(fresh_database) as proxy, Database(proxy.dsn) as db:
        await db.migrate(SHARED_MIGRATIONS)
        rule = PruneRule.by_age("inbox", "received_at", keep_for=DAY)
        pruner = Pruner(db, [rule], interval=0.05)
        proxy.play_starting_up()  # every pass now fails: "the database system is starting up"
        async with asyncio.TaskGroup() as group:
            loop = group.create_task(pruner.run())
            await asyncio.sleep(0.5)  # several failed passes
            assert not loop.done()

            proxy.mode = "forward"
            conn = await asyncpg.connect(fresh_database)
            try:
                await add_inbox(conn, age=OLD)
                async with asyncio.timeout(10):
                    while await conn.fetchval("SELECT count(*) FROM inbox"):
                        await asyncio.sleep(0.05)
            finally:
                await conn.close()
            loop.cancel()


async def test_a_broken_rule_ends_the_loop_for_the_supervisor(order_db: Database) -> None:
    broken = PruneRule("inbox", DAY, "DELETE FROM inbox WHERE no_such_column < $1 AND $2 > 0", ())
    with pytest.raises(asyncpg.UndefinedColumnError):
        await Pruner(order_db, [broken], interval=0.01).run()


@pytest.mark.parametrize("name", ["idempotency_retention_days", "inbox_retention_days"])
def test_dedup_retentions_below_a_day_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="at least 1 day"):
        ServiceSettings(**{name: 0.5})  # type: ignore[arg-type]
    assert getattr(ServiceSettings(**{name: 0}), name) == 0  # type: ignore[arg-type]


async def test_every_service_runs_the_pruner_and_shows_it(fresh_database: str) -> None:
    settings = PaymentSettings(
        database_url=fresh_database, port=18171, outbox_relay="off", prune_interval=0.1
    )
    async with running(PAYMENT, settings, InMemoryRegistry()) as client:
        body = await wait_ready(client)
        assert body["details"]["background"]["retention"]["state"] == "running"
        conn = await asyncpg.connect(fresh_database)
        try:
            await add_inbox(conn, age=OLD)
            recent = await add_inbox(conn, age=RECENT)
            async with asyncio.timeout(10):
                while await conn.fetchval("SELECT count(*) FROM inbox") > 1:
                    await asyncio.sleep(0.05)
            assert await keys(conn, "inbox", "message_id") == {recent}
        finally:
            await conn.close()
        metrics = (await client.get("/metrics")).text
        assert 'retention_pruned_rows_total{table="inbox"} 1.0' in metrics
