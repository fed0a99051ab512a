"""The saga engine against a real Postgres, with in-process step functions."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from typing import Any

import asyncpg
import pytest
from ordermesh_shared.database import Database
from ordermesh_shared.resilience import deadline_scope, remaining
from ordermesh_shared.saga import (
    SAGA_MIGRATIONS,
    SagaDefinition,
    SagaEngine,
    SagaMetrics,
    SagaPolicy,
    Step,
    StepCall,
    StepFailed,
)
from ordermesh_shared.saga import store as saga_store
from prometheus_client import CollectorRegistry

from tests.support.sagas import FAST, PRICE, Booked, Trip, World

pytestmark = pytest.mark.integration


@pytest.fixture
async def pool(fresh_database: str) -> AsyncIterator[asyncpg.Pool]:
    async with Database(fresh_database) as db:
        await db.migrate(SAGA_MIGRATIONS)
        yield db.pool


async def start(
    engine: SagaEngine, pool: asyncpg.Pool, definition: SagaDefinition[Trip]
) -> uuid.UUID:
    saga_id = uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
        await engine.create(conn, definition, saga_id, Trip("Lisbon"))
    engine.launch(saga_id)
    return saga_id


async def saga_status(pool: asyncpg.Pool, saga_id: uuid.UUID) -> tuple[str, str | None]:
    row = await pool.fetchrow("SELECT status, failure_reason FROM sagas WHERE id = $1", saga_id)
    return row["status"], row["failure_reason"]


async def test_happy_path_runs_every_step_once_with_stable_keys(pool: asyncpg.Pool) -> None:
    world = World()
    definition = world.definition()
    async with SagaEngine(pool, owner="t1", definitions=[definition], policy=FAST) as engine:
        saga_id = await start(engine, pool, definition)
        assert await engine.wait(saga_id, timeout=5)
    assert world.calls == ["flight", "hotel", "car"]
    assert world.keys == [f"{saga_id}:flight", f"{saga_id}:hotel", f"{saga_id}:car"]
    assert await saga_status(pool, saga_id) == ("completed", None)
    assert world.outcomes[0].results.by_step() == {
        name: Booked(name, "Lisbon", PRICE) for name in ("flight", "hotel", "car")
    }


async def test_business_failure_compensates_earlier_steps_in_reverse(pool: asyncpg.Pool) -> None:
    world = World()
    world.failures["car"] = [StepFailed("no_cars", "every car is taken")]
    definition = world.definition()
    async with SagaEngine(pool, owner="t1", definitions=[definition], policy=FAST) as engine:
        saga_id = await start(engine, pool, definition)
        assert await engine.wait(saga_id, timeout=5)
    # The rejected step did nothing, so only the two before it are undone, last first.
    assert world.calls == ["flight", "hotel", "car", "undo-hotel", "undo-flight"]
    assert await saga_status(pool, saga_id) == ("cancelled", "no_cars: every car is taken")
    log = await pool.fetch(
        "SELECT step, direction, status FROM saga_steps WHERE saga_id = $1", saga_id
    )
    assert {(r["step"], r["direction"]): r["status"] for r in log} == {
        ("flight", "forward"): "succeeded",
        ("hotel", "forward"): "succeeded",
        ("car", "forward"): "rejected",
        ("hotel", "compensate"): "succeeded",
        ("flight", "compensate"): "succeeded",
    }


async def test_faults_are_retried_with_the_same_key(pool: asyncpg.Pool) -> None:
    world = World()
    world.failures["hotel"] = [ConnectionError("reset"), TimeoutError()]
    definition = world.definition()
    async with SagaEngine(pool, owner="t1", definitions=[definition], policy=FAST) as engine:
        saga_id = await start(engine, pool, definition)
        assert await engine.wait(saga_id, timeout=5)
    assert world.calls == ["flight", "hotel", "hotel", "hotel", "car"]
    assert set(world.keys[1:4]) == {f"{saga_id}:hotel"}
    attempts = await pool.fetchval(
        "SELECT attempts FROM saga_steps WHERE saga_id = $1 AND step = 'hotel'", saga_id
    )
    assert attempts == 3
    assert await saga_status(pool, saga_id) == ("completed", None)


async def test_a_step_that_keeps_timing_out_is_compensated_too(pool: asyncpg.Pool) -> None:
    world = World()
    world.hang.add("hotel")
    definition = world.definition()
    async with SagaEngine(pool, owner="t1", definitions=[definition], policy=FAST) as engine:
        saga_id = await start(engine, pool, definition)
        assert await engine.wait(saga_id, timeout=5)
    # A timed-out step may have happened: its undo runs as well (participants tolerate it).
    assert world.calls[-2:] == ["undo-hotel", "undo-flight"]
    status, reason = await saga_status(pool, saga_id)
    assert status == "cancelled"
    assert reason is not None
    assert reason.startswith("hotel failed: TimeoutError")


async def test_an_undo_that_keeps_failing_on_faults_is_retried_until_it_goes_through(
    pool: asyncpg.Pool,
) -> None:
    # More faults than compensation_attempts: an outage must not park the saga holding
    # what the undo gives back.
    world = World()
    world.failures["car"] = [StepFailed("no_cars", "none")]
    world.failures["undo-flight"] = [ConnectionError("down")] * (FAST.compensation_attempts + 3)
    definition = world.definition()
    async with SagaEngine(pool, owner="t1", definitions=[definition], policy=FAST) as engine:
        saga_id = await start(engine, pool, definition)
        assert await engine.wait(saga_id, timeout=10)
    assert await saga_status(pool, saga_id) == ("cancelled", "no_cars: none")
    assert world.calls.count("undo-flight") == FAST.compensation_attempts + 4


async def test_an_undo_refused_again_and_again_parks_and_can_be_reopened(
    pool: asyncpg.Pool,
) -> None:
    world = World()
    world.failures["car"] = [StepFailed("no_cars", "none")]
    world.failures["undo-flight"] = [StepFailed("refused", "not now")] * 3
    definition = world.definition()
    async with SagaEngine(pool, owner="t1", definitions=[definition], policy=FAST) as engine:
        saga_id = await start(engine, pool, definition)
        assert await engine.wait(saga_id, timeout=5)
        assert (await saga_status(pool, saga_id))[0] == "compensation_failed"
        assert world.outcomes[-1].status == "compensation_failed"
        async with pool.acquire() as conn, conn.transaction():
            assert await engine.reopen(conn, saga_id)
        engine.launch(saga_id)
        assert await engine.wait(saga_id, timeout=5)
    assert await saga_status(pool, saga_id) == ("cancelled", "no_cars: none")
    # hotel's undo succeeded the first time and is not repeated on the retry.
    assert world.calls.count("undo-hotel") == 1
    assert world.calls.count("undo-flight") == 4


async def test_orphaned_saga_is_resumed_by_another_owner(pool: asyncpg.Pool) -> None:
    world = World()
    world.hang.add("hotel")
    definition = world.definition()
    crashed = SagaEngine(pool, owner="a", definitions=[definition], policy=FAST)
    await crashed.__aenter__()
    saga_id = await start(crashed, pool, definition)
    while "hotel" not in world.calls:
        await asyncio.sleep(0.01)
    # Simulate a crash: the owner stops without finishing and its lease lapses.
    for task in [*crashed._loops, *crashed._running.values()]:
        task.cancel()
    await asyncio.sleep(0.1)
    world.hang.clear()
    async with SagaEngine(pool, owner="b", definitions=[definition], policy=FAST):
        async with asyncio.timeout(5):
            while (await saga_status(pool, saga_id))[0] != "completed":
                await asyncio.sleep(0.05)
    # The in-doubt step was re-sent with the same idempotency key.
    assert world.keys.count(f"{saga_id}:hotel") == 2
    assert world.calls.count("flight") == 1


async def test_restarted_instance_takes_back_its_sagas_without_waiting(pool: asyncpg.Pool) -> None:
    world = World()
    slow = SagaPolicy(forward_deadline=1.0, retry_backoff_max=0.05, lease_ttl=60.0)
    definition = world.definition()
    saga_id = uuid.uuid4()
    first = SagaEngine(pool, owner="order-1", definitions=[definition], policy=slow)
    async with pool.acquire() as conn, conn.transaction():
        await first.create(conn, definition, saga_id, Trip("Porto"))
    # 'first' died before launching; its lease has 60 s left, but the same instance restarts.
    async with SagaEngine(pool, owner="order-1", definitions=[definition], policy=slow):
        async with asyncio.timeout(3):
            while (await saga_status(pool, saga_id))[0] != "completed":
                await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("claimer", "other"),
    [("order_1", "order-1"), ("%", "payment-1"), ("a\\_b", "a\\xb"), ("c\\%", "c\\zz")],
)
async def test_a_restarted_instance_takes_back_only_its_own_sagas(
    pool: asyncpg.Pool, claimer: str, other: str
) -> None:
    """The instance id is matched literally: ``_``, ``%`` and ``\\`` in it are no wildcards
    that would take over another live instance's sagas."""
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
        await saga_store.insert_saga(conn, mine, "trip", {}, owner=f"{claimer}/old", ttl=60)
        await saga_store.insert_saga(conn, theirs, "trip", {}, owner=f"{other}/live", ttl=60)
        claimed = await saga_store.claim_orphans(conn, f"{claimer}/new", instance=claimer, ttl=60)
    assert claimed == [mine]
    owners = dict(await pool.fetch("SELECT id, owner FROM sagas"))
    assert owners == {mine: f"{claimer}/new", theirs: f"{other}/live"}


async def test_a_saga_whose_task_died_is_resumed_by_its_own_process(pool: asyncpg.Pool) -> None:
    world = World()
    definition = world.definition()
    async with SagaEngine(pool, owner="t1", definitions=[definition], policy=FAST) as engine:
        saga_id = uuid.uuid4()
        async with pool.acquire() as conn, conn.transaction():
            await engine.create(conn, definition, saga_id, Trip("Faro"))
        # Never launched, as if its task had died on a database error: the heartbeat keeps
        # the lease fresh, so only the owner itself can notice and resume it.
        async with asyncio.timeout(5):
            while (await saga_status(pool, saga_id))[0] != "completed":
                await asyncio.sleep(0.05)
    assert world.calls == ["flight", "hotel", "car"]


async def test_steps_and_undos_run_on_their_own_budgets_not_the_launchers(
    pool: asyncpg.Pool,
) -> None:
    world = World()
    world.failures["car"] = [StepFailed("no_cars", "none")]
    budgets: dict[str, float | None] = {}
    definition = world.definition()
    steps = tuple(_recording_budget(step, budgets) for step in definition.steps)
    definition = SagaDefinition(
        "trip", steps=steps, encode=asdict, decode=Trip.from_json, on_finish=definition.on_finish
    )
    async with SagaEngine(pool, owner="t1", definitions=[definition], policy=FAST) as engine:
        with deadline_scope(0.001):  # as if launched by a request with 1 ms left
            saga_id = await start(engine, pool, definition)
        assert await engine.wait(saga_id, timeout=5)
    assert await saga_status(pool, saga_id) == ("cancelled", "no_cars: none")
    # Every call saw (about) its step's own 0.3 s, the undos included.
    assert set(budgets) == {"flight", "hotel", "car", "undo-hotel", "undo-flight"}
    assert all(left is not None and 0.2 < left <= 0.3 for left in budgets.values()), budgets


def _recording_budget(step: Step[Trip], budgets: dict[str, float | None]) -> Step[Trip]:
    async def action(call: StepCall[Trip]) -> object:
        budgets[step.name] = remaining()
        return await step.action(call)

    async def undo(call: StepCall[Trip]) -> None:
        budgets[f"undo-{step.name}"] = remaining()
        assert step.compensation is not None
        await step.compensation(call)

    return replace(step, action=action, compensation=undo)


class FlakyPool:
    """The real pool, except that while ``failing`` every acquire raises what a database cut
    raises in asyncpg (InterfaceError, InternalClientError), in turn."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.failing = False
        self.failures = 0

    def acquire(self) -> Any:
        if not self.failing:
            return self._pool.acquire()
        self.failures += 1
        if self.failures % 2:
            return _Raising(
                asyncpg.InterfaceError("cannot perform operation: connection is closed")
            )
        return _Raising(asyncpg.InternalClientError("unexpected connection state"))


class _Raising:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def __aenter__(self) -> None:
        raise self.error

    async def __aexit__(self, *exc_info: object) -> None:
        return None


async def test_loops_fed_interface_errors_live_on_and_resume_a_stranded_saga(
    pool: asyncpg.Pool,
) -> None:
    world = World()
    definition = world.definition()
    policy = replace(FAST, lease_ttl=2.0)
    flaky = FlakyPool(pool)
    engine = SagaEngine(flaky, owner="t1", definitions=[definition], policy=policy)  # type: ignore[arg-type]
    async with engine:
        flaky.failing = True
        async with asyncio.timeout(10):  # both loops ticked into the errors, several times
            while flaky.failures < 6:
                await asyncio.sleep(0.02)
        flaky.failing = False
        assert not any(loop.done() for loop in engine._loops)
        saga_id = uuid.uuid4()
        async with pool.acquire() as conn, conn.transaction():
            await engine.create(conn, definition, saga_id, Trip("Braga"))
        # Never launched (its task died, say): the recovery loop must find it.
        async with asyncio.timeout(2 * policy.lease_ttl):
            while (await saga_status(pool, saga_id))[0] != "completed":
                await asyncio.sleep(0.05)
        assert not any(loop.done() for loop in engine._loops)
    assert world.calls == ["flight", "hotel", "car"]


async def test_a_step_after_the_pivot_is_retried_past_the_deadline_until_it_succeeds(
    pool: asyncpg.Pool,
) -> None:
    """Answers lost for longer than the forward deadline: before the pivot that compensates,
    after it the saga keeps going forward and completes; nothing is undone."""
    world = World()
    world.hang.add("car")
    definition = world.with_pivot()
    async with SagaEngine(pool, owner="t1", definitions=[definition], policy=FAST) as engine:
        saga_id = await start(engine, pool, definition)
        await asyncio.sleep(FAST.forward_deadline * 1.5)
        world.hang.clear()  # the participant answers again
        assert await engine.wait(saga_id, timeout=10)
    assert await saga_status(pool, saga_id) == ("completed", None)
    assert not [call for call in world.calls if call.startswith("undo-")]
    log = await pool.fetchrow(
        "SELECT status, attempts, last_error FROM saga_steps WHERE saga_id = $1 AND step = 'car'",
        saga_id,
    )
    assert log["status"] == "succeeded"
    assert log["attempts"] >= 3  # each lost answer shows in the step log
    assert "TimeoutError" in log["last_error"]


async def test_a_refusal_after_the_pivot_is_retried_not_compensated(pool: asyncpg.Pool) -> None:
    world = World()
    world.failures["car"] = [StepFailed("not_yet", "try again")] * 3
    definition = world.with_pivot()
    async with SagaEngine(pool, owner="t1", definitions=[definition], policy=FAST) as engine:
        saga_id = await start(engine, pool, definition)
        assert await engine.wait(saga_id, timeout=10)
    assert await saga_status(pool, saga_id) == ("completed", None)
    assert world.calls == ["flight", "hotel", "car", "car", "car", "car"]


async def test_the_pivot_itself_still_compensates_when_refused(pool: asyncpg.Pool) -> None:
    world = World()
    world.failures["hotel"] = [StepFailed("full", "no rooms")]
    definition = world.with_pivot()
    async with SagaEngine(pool, owner="t1", definitions=[definition], policy=FAST) as engine:
        saga_id = await start(engine, pool, definition)
        assert await engine.wait(saga_id, timeout=5)
    assert await saga_status(pool, saga_id) == ("cancelled", "full: no rooms")
    assert world.calls == ["flight", "hotel", "undo-flight"]


def test_a_step_after_the_pivot_may_not_have_a_compensation() -> None:
    world = World()
    with pytest.raises(ValueError, match="never compensated"):
        replace(world.definition(), pivot="hotel")
    with pytest.raises(ValueError, match="not one of"):
        replace(world.definition(), pivot="boat")


async def test_step_log_writes_of_a_process_that_lost_the_saga_change_nothing(
    pool: asyncpg.Pool,
) -> None:
    saga_id = uuid.uuid4()
    async with pool.acquire() as conn:
        await saga_store.insert_saga(conn, saga_id, "trip", {}, owner="a/1", ttl=60)
        await saga_store.step_started(
            conn, saga_id, "a/1", step="flight", direction="forward", position=0
        )
        with pytest.raises(saga_store.LostOwnership):
            await saga_store.attempt_made(
                conn, saga_id, "b/1", step="flight", direction="forward", error="late"
            )
        with pytest.raises(saga_store.LostOwnership):
            await saga_store.step_finished(
                conn, saga_id, "b/1", step="flight", direction="forward", status="failed"
            )
    row = await pool.fetchrow("SELECT status, attempts, last_error FROM saga_steps")
    assert dict(row) == {"status": "started", "attempts": 0, "last_error": None}


async def test_metrics_count_how_sagas_end_and_what_was_retried(pool: asyncpg.Pool) -> None:
    registry = CollectorRegistry()
    world = World()
    world.failures["hotel"] = [ConnectionError("reset")]  # one retried fault, then completed
    definition = world.definition()
    engine = SagaEngine(
        pool, owner="t1", definitions=[definition], policy=FAST, metrics=SagaMetrics(registry)
    )
    async with engine:
        first = await start(engine, pool, definition)
        assert registry.get_sample_value("sagas_in_flight") == 1
        assert await engine.wait(first, timeout=5)
        world.failures["car"] = [StepFailed("no_cars", "none")]
        second = await start(engine, pool, definition)
        assert await engine.wait(second, timeout=5)
        assert registry.get_sample_value("sagas_in_flight") == 0

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"saga": "trip", **labels})

    assert sample("sagas_started_total") == 2
    assert sample("sagas_finished_total", status="completed", step="") == 1
    assert sample("sagas_finished_total", status="cancelled", step="car") == 1
    retried = {"step": "hotel", "direction": "forward"}
    assert sample("saga_step_failed_attempts_total", **retried) == 1
    assert sample("saga_step_failed_attempts_total", step="car", direction="forward") == 1
    hotel = {**retried, "outcome": "succeeded"}
    assert sample("saga_step_duration_seconds_count", **hotel) == 2
    undone = {"step": "flight", "direction": "compensate", "outcome": "succeeded"}
    assert sample("saga_step_duration_seconds_count", **undone) == 1


async def test_a_step_stuck_after_the_pivot_shows_until_it_goes_through(
    pool: asyncpg.Pool,
) -> None:
    registry = CollectorRegistry()
    world = World()
    world.failures["car"] = [ConnectionError("down")] * 12
    definition = world.with_pivot()
    policy = replace(FAST, alert_after_attempts=2, forward_backoff_max=0.02)
    engine = SagaEngine(
        pool, owner="t1", definitions=[definition], policy=policy, metrics=SagaMetrics(registry)
    )
    stuck = {"saga": "trip", "step": "car"}
    async with engine:
        saga_id = await start(engine, pool, definition)
        async with asyncio.timeout(5):
            while registry.get_sample_value("saga_steps_stuck_after_pivot", stuck) != 1:
                await asyncio.sleep(0.005)
        assert await engine.wait(saga_id, timeout=5)
    assert registry.get_sample_value("saga_steps_stuck_after_pivot", stuck) == 0
    assert await saga_status(pool, saga_id) == ("completed", None)
