"""The saga engine's rules without a database: the in-memory store keeps what Postgres keeps.

Compensation order, the pivot, parking and crash recovery at every step boundary; the
integration suite runs the same engine on Postgres.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import pytest
import structlog
from ordermesh_shared.saga import SagaDefinition, SagaEngine, StepCall, StepFailed
from ordermesh_shared.saga.memory import InMemorySagaStore

from tests.support.sagas import FAST, PRICE, Booked, Trip, World


async def start(engine: SagaEngine, definition: SagaDefinition[Trip]) -> uuid.UUID:
    saga_id = uuid.uuid4()
    await engine.create(None, definition, saga_id, Trip("Lisbon"))
    engine.launch(saga_id)
    return saga_id


def status(store: InMemorySagaStore, saga_id: uuid.UUID) -> tuple[str, str | None]:
    saga = store.sagas[saga_id]
    return saga.status, saga.failure_reason


async def run_one(world: World, definition: SagaDefinition[Trip]) -> InMemorySagaStore:
    store = InMemorySagaStore()
    async with SagaEngine(None, owner="t", definitions=[definition], policy=FAST, store=store) as e:
        saga_id = await start(e, definition)
        assert await e.wait(saga_id, timeout=10)
    return store


async def test_a_refusal_undoes_what_came_before_last_first() -> None:
    world = World()
    world.failures["car"] = [StepFailed("no_cars", "none left")]
    store = await run_one(world, world.definition())
    (saga_id,) = store.sagas
    assert world.calls == ["flight", "hotel", "car", "undo-hotel", "undo-flight"]
    assert status(store, saga_id) == ("cancelled", "no_cars: none left")
    assert {key: entry.status for key, entry in store.log(saga_id).items()} == {
        ("flight", "forward"): "succeeded",
        ("hotel", "forward"): "succeeded",
        ("car", "forward"): "rejected",
        ("hotel", "compensate"): "succeeded",
        ("flight", "compensate"): "succeeded",
    }
    assert world.outcomes[-1].status == "cancelled"


async def test_results_of_each_step_reach_the_outcome_as_stored() -> None:
    world = World()
    store = await run_one(world, world.definition())
    (saga_id,) = store.sagas
    assert status(store, saga_id) == ("completed", None)
    assert world.outcomes[-1].results.by_step() == {
        name: Booked(name, "Lisbon", PRICE) for name in ("flight", "hotel", "car")
    }
    assert all(entry.attempts == 1 for entry in store.log(saga_id).values())


async def test_after_the_pivot_faults_and_refusals_are_retried_until_it_goes_through() -> None:
    world = World()
    world.failures["car"] = [ConnectionError("down"), StepFailed("not_yet", "later")] * 3
    store = await run_one(world, world.with_pivot())
    (saga_id,) = store.sagas
    assert status(store, saga_id) == ("completed", None)
    assert world.calls == ["flight", "hotel", *["car"] * 7]
    assert store.log(saga_id)[("car", "forward")].attempts == 7


async def test_a_fault_before_the_pivot_past_the_deadline_compensates() -> None:
    world = World()
    world.failures["hotel"] = [ConnectionError("down")] * 1000
    policy_fast = replace(FAST, forward_deadline=0.2)
    store = InMemorySagaStore()
    definition = world.with_pivot()
    async with SagaEngine(
        None, owner="t", definitions=[definition], policy=policy_fast, store=store
    ) as engine:
        saga_id = await start(engine, definition)
        assert await engine.wait(saga_id, timeout=10)
    saga_status, reason = status(store, saga_id)
    assert saga_status == "cancelled"
    assert reason is not None
    assert reason.startswith("hotel failed: ConnectionError")
    # The step that failed may have happened: it is undone too, then the one before it.
    assert world.calls[-2:] == ["undo-hotel", "undo-flight"]


async def test_an_undo_refused_past_the_limit_parks_and_reopens() -> None:
    world = World()
    world.failures["car"] = [StepFailed("no_cars", "none")]
    world.failures["undo-flight"] = [StepFailed("refused", "not now")] * FAST.compensation_attempts
    definition = world.definition()
    store = InMemorySagaStore()
    async with SagaEngine(
        None, owner="t", definitions=[definition], policy=FAST, store=store
    ) as engine:
        saga_id = await start(engine, definition)
        assert await engine.wait(saga_id, timeout=10)
        assert status(store, saga_id)[0] == "compensation_failed"
        assert await engine.reopen(None, saga_id)
        engine.launch(saga_id)
        assert await engine.wait(saga_id, timeout=10)
    assert status(store, saga_id) == ("cancelled", "no_cars: none")
    assert world.calls.count("undo-hotel") == 1  # done once, not repeated on the retry


@pytest.mark.parametrize("crash_in", ["flight", "hotel", "car", "undo-hotel", "undo-flight"])
async def test_a_crash_at_any_step_is_resumed_by_another_owner_with_the_same_keys(
    crash_in: str,
) -> None:
    """The owner dies while ``crash_in`` runs; another instance takes the saga over once the
    lease lapses and re-sends that step with its key: each step runs at most twice, the
    earlier ones once, and the saga ends as it would have."""
    world = World()
    if crash_in.startswith("undo-"):
        world.failures["car"] = [StepFailed("no_cars", "none")]
    world.hang.add(crash_in)
    definition = world.definition()
    store = InMemorySagaStore()
    crashed = SagaEngine(None, owner="a", definitions=[definition], policy=FAST, store=store)
    await crashed.__aenter__()
    saga_id = await start(crashed, definition)
    async with asyncio.timeout(5):
        while crash_in not in world.calls:
            await asyncio.sleep(0.005)
    for task in [*crashed._loops, *crashed._running.values(), *crashed._compensations]:
        task.cancel()  # killed: no shutdown, no handover; its lease lapses
    world.hang.clear()
    async with SagaEngine(None, owner="b", definitions=[definition], policy=FAST, store=store):
        async with asyncio.timeout(5):
            while store.sagas[saga_id].status in ("running", "compensating"):
                await asyncio.sleep(0.01)
    expected = "cancelled" if crash_in.startswith("undo-") else "completed"
    assert store.sagas[saga_id].status == expected
    assert world.calls.count(crash_in) == 2
    assert all(world.calls.count(call) <= 2 for call in world.calls)
    sent = [key for key in world.keys if key.startswith(f"{saga_id}:")]
    assert len(sent) == len(world.keys)  # every call carried this saga's stable key
    if crash_in == "car":  # resumed elsewhere: earlier results come back typed, from storage
        booked = {name: Booked(name, "Lisbon", PRICE) for name in ("flight", "hotel")}
        assert world.seen["car"] == booked


async def test_each_step_gets_the_typed_results_of_the_steps_before_it() -> None:
    world = World()
    await run_one(world, world.definition())
    assert world.seen["flight"] == {}
    assert world.seen["hotel"] == {"flight": Booked("flight", "Lisbon", PRICE)}
    assert isinstance(world.seen["car"]["hotel"], Booked)


def test_a_step_returning_another_type_than_it_declares_is_a_bug() -> None:
    world = World()
    definition = world.definition()
    with pytest.raises(TypeError, match="returned a dict, not a Booked"):
        definition.encode_result(definition.steps[0], {"price": "12.50"})


async def test_every_line_logged_while_a_saga_runs_names_it() -> None:
    world = World()
    world.failures["hotel"] = [ConnectionError("reset")]

    async def hotel_logs(call: StepCall[Trip]) -> Booked:
        structlog.get_logger("participant").info("calling the hotel")
        return await hotel.action(call)  # type: ignore[return-value]

    plain = world.definition()
    hotel = plain.steps[1]
    definition = replace(
        plain, steps=(plain.steps[0], replace(hotel, action=hotel_logs), *plain.steps[2:])
    )
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        store = await run_one(world, definition)
    (saga_id,) = store.sagas
    mine = [line for line in logs if line["event"] in ("calling the hotel", "saga.finished")]
    assert len(mine) == 3  # the step twice (one fault), the end once
    assert {line.get("saga_id") for line in mine} == {str(saga_id)}
