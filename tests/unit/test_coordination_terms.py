"""run_while_leader's term loop, on the in-memory election: step down, re-campaign, stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from ordermesh_shared.coordination import LeaderElection, Term

from tests.support.fakes_coordination import InMemoryElection, InMemoryElectorate


class Recorder:
    """Leader work that records what happened to it, and runs until cancelled."""

    def __init__(self) -> None:
        self.started: list[Term] = []
        self.cancelled: list[Term] = []
        self.running = asyncio.Event()

    async def work(self, term: Term) -> None:
        self.started.append(term)
        self.running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(term)
            self.running.clear()
            raise


@contextlib.asynccontextmanager
async def running(
    election: LeaderElection, recorder: Recorder
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(election.run_while_leader(recorder.work))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(predicate: object, *, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not (predicate() if callable(predicate) else predicate):
            await asyncio.sleep(0.005)


@pytest.fixture
def electorate() -> InMemoryElectorate:
    return InMemoryElectorate()


async def test_lost_term_cancels_work_and_next_contender_takes_over(
    electorate: InMemoryElectorate,
) -> None:
    first, second = Recorder(), Recorder()
    async with (
        running(InMemoryElection(electorate, "a"), first),
        running(InMemoryElection(electorate, "b"), second),
    ):
        await until(lambda: first.running.is_set())
        electorate.depose()
        await until(lambda: second.running.is_set())

        assert first.cancelled == first.started  # stepped down before b started
        assert second.started[0].token > first.started[0].token


async def test_work_that_fails_is_restarted_after_a_backoff(electorate: InMemoryElectorate) -> None:
    attempts: list[int] = []

    async def failing(term: Term) -> None:
        attempts.append(term.token)
        raise RuntimeError("broken leader work")

    task = asyncio.create_task(InMemoryElection(electorate, "a").run_while_leader(failing))
    await asyncio.sleep(0.5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    assert 2 <= len(attempts) <= 6  # retried, with growing pauses: never a hot loop
    assert attempts == sorted(set(attempts))  # a fresh term (and token) each time


async def test_work_that_returns_is_run_again_in_a_new_term(electorate: InMemoryElectorate) -> None:
    terms: list[Term] = []

    async def one_shot(term: Term) -> None:
        terms.append(term)

    task = asyncio.create_task(InMemoryElection(electorate, "a").run_while_leader(one_shot))
    await until(lambda: len(terms) >= 2)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_cancelling_the_owner_stops_work_and_hands_over(
    electorate: InMemoryElectorate,
) -> None:
    first, second = Recorder(), Recorder()
    async with running(InMemoryElection(electorate, "a"), first) as owner:
        await until(lambda: first.running.is_set())
        async with running(InMemoryElection(electorate, "b"), second):
            owner.cancel()
            await until(lambda: second.running.is_set())

            assert owner.cancelled()
            assert first.cancelled == first.started  # the work was cancelled and awaited
            assert electorate.current is second.started[0]


async def test_resign_hands_over_and_observers_see_each_leader(
    electorate: InMemoryElectorate,
) -> None:
    a, b = InMemoryElection(electorate, "a"), InMemoryElection(electorate, "b")
    observed: list[str] = []

    async def watch() -> None:
        async for value in b.observe():
            observed.append(value)

    watcher = asyncio.create_task(watch())
    first, second = Recorder(), Recorder()
    async with running(a, first):
        await until(lambda: a.is_leader)
        async with running(b, second):
            await until(lambda: len(electorate.queue) == 2)
            await a.resign()
            await until(lambda: b.is_leader)

            assert first.cancelled == first.started
            assert await a.leader() == "b"
            await until(lambda: observed[-1:] == ["b"])
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    assert observed[:2] == ["a", "b"]
