"""The in-memory saga store keeps the Postgres store's rules: the same checks on both, so unit
tests of the engine on the fake say something about the engine on Postgres."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from ordermesh_shared.database import Database
from ordermesh_shared.saga import SAGA_MIGRATIONS
from ordermesh_shared.saga.memory import InMemorySagaStore
from ordermesh_shared.saga.store import (
    LostOwnership,
    PostgresSagaStore,
    SagaStore,
    StepDone,
)

pytestmark = pytest.mark.integration


class Stores:
    """One store under test, and how to start a saga in it (Postgres: in a transaction)."""

    def __init__(self, store: SagaStore, db: Database | None) -> None:
        self.store = store
        self.db = db

    async def insert(self, owner: str, ttl: float = 60) -> uuid.UUID:
        saga_id = uuid.uuid4()
        if self.db is None:
            await self.store.insert(None, saga_id, "trip", {"city": "Faro"}, owner=owner, ttl=ttl)
            return saga_id
        async with self.db.pool.acquire() as conn, conn.transaction():
            await self.store.insert(conn, saga_id, "trip", {"city": "Faro"}, owner=owner, ttl=ttl)
        return saga_id

    async def reopen(self, saga_id: uuid.UUID, owner: str) -> bool:
        if self.db is None:
            return await self.store.reopen(None, saga_id, owner, 60)
        async with self.db.pool.acquire() as conn, conn.transaction():
            return await self.store.reopen(conn, saga_id, owner, 60)


@pytest.fixture(params=["postgres", "memory"])
async def stores(request: pytest.FixtureRequest, fresh_database: str) -> AsyncIterator[Stores]:
    if request.param == "memory":
        yield Stores(InMemorySagaStore(), None)
        return
    async with Database(fresh_database) as db:
        await db.migrate(SAGA_MIGRATIONS)
        yield Stores(PostgresSagaStore(lambda: db.pool), db)


async def test_steps_advance_and_results_are_kept_as_json(stores: Stores) -> None:
    store = stores.store
    saga_id = await stores.insert("a/1")
    await store.step_started(saga_id, "a/1", step="flight", direction="forward", position=0)
    done = StepDone("flight", {"price": "12.50", "seats": 2})
    await store.step_started(
        saga_id, "a/1", step="hotel", direction="forward", position=1, done=done
    )
    await store.attempt_made(saga_id, "a/1", step="hotel", direction="forward", error="503")
    saga = await store.load(saga_id)
    assert saga is not None
    assert (saga.status, saga.started_steps, saga.data) == ("running", 2, done.data)
    assert saga.input == {"city": "Faro"}
    assert await store.statuses(saga_id) == {
        ("flight", "forward"): "succeeded",
        ("hotel", "forward"): "started",
    }


async def test_every_write_of_another_owner_is_refused(stores: Stores) -> None:
    store = stores.store
    saga_id = await stores.insert("a/1")
    await store.step_started(saga_id, "a/1", step="flight", direction="forward", position=0)
    writes: list[Any] = [
        store.step_started(saga_id, "b/1", step="hotel", direction="forward", position=1),
        store.step_succeeded(saga_id, "b/1", step="flight", direction="forward", data={}),
        store.attempt_made(saga_id, "b/1", step="flight", direction="forward", error="x"),
        store.step_finished(saga_id, "b/1", step="flight", direction="forward", status="failed"),
        store.set_status(saga_id, "b/1", "compensating", "late"),
        store.finish(saga_id, "b/1", status="completed", reason=None, done=None, writes=None),
    ]
    for write in writes:
        with pytest.raises(LostOwnership):
            await write
    saga = await store.load(saga_id)
    assert saga is not None
    assert (saga.status, saga.failure_reason) == ("running", None)
    assert await store.statuses(saga_id) == {("flight", "forward"): "started"}


async def test_the_first_failure_reason_is_kept(stores: Stores) -> None:
    saga_id = await stores.insert("a/1")
    assert await stores.store.set_status(saga_id, "a/1", "compensating", "first") == "first"
    reason = await stores.store.finish(
        saga_id, "a/1", status="cancelled", reason="second", done=None, writes=None
    )
    assert reason == "first"


async def test_orphans_are_lapsed_leases_and_predecessors_only(stores: Stores) -> None:
    store = stores.store
    lapsed = await stores.insert("x/1", ttl=-1)
    predecessor = await stores.insert("order-1/old")
    live = await stores.insert("order-10/live")
    ended = await stores.insert("order-1/older")
    await store.finish(
        ended, "order-1/older", status="completed", reason=None, done=None, writes=None
    )
    claimed = await store.claim_orphans("order-1/new", instance="order-1", ttl=60)
    assert sorted(claimed) == sorted([lapsed, predecessor])
    assert sorted(await store.own_unfinished("order-1/new")) == sorted([lapsed, predecessor])
    assert await store.own_unfinished("order-10/live") == [live]


async def test_only_a_parked_saga_reopens(stores: Stores) -> None:
    store = stores.store
    saga_id = await stores.insert("a/1")
    assert not await stores.reopen(saga_id, "b/1")  # not parked
    await store.finish(
        saga_id, "a/1", status="compensation_failed", reason="refused", done=None, writes=None
    )
    assert await stores.reopen(saga_id, "b/1")
    saga = await store.load(saga_id)
    assert saga is not None
    assert saga.status == "compensating"
    assert await store.own_unfinished("b/1") == [saga_id]


class _BrokenWrites:
    """A service write that fails in the statement ending the saga."""

    def ctes(self, after: str, first: int) -> tuple[str, list[Any]]:
        return f"broken AS (INSERT INTO no_such_table SELECT id FROM {after})", []

    @property
    def select(self) -> str:
        return "0"


async def test_a_failing_service_write_leaves_the_saga_unfinished(fresh_database: str) -> None:
    """Postgres only (the in-memory store keeps writes, it runs no SQL): the saga's end and
    the service's writes are one statement."""
    async with Database(fresh_database) as db:
        await db.migrate(SAGA_MIGRATIONS)
        stores = Stores(PostgresSagaStore(lambda: db.pool), db)
        saga_id = await stores.insert("a/1")
        await stores.store.step_started(
            saga_id, "a/1", step="flight", direction="forward", position=0
        )
        with pytest.raises(asyncpg.UndefinedTableError):
            await stores.store.finish(
                saga_id,
                "a/1",
                status="completed",
                reason=None,
                done=StepDone("flight", {"x": 1}),
                writes=_BrokenWrites(),
            )
        saga = await stores.store.load(saga_id)
        assert saga is not None
        assert (saga.status, saga.data) == ("running", {})
        assert await stores.store.statuses(saga_id) == {("flight", "forward"): "started"}
