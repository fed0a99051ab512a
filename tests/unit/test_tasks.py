"""Supervised background loops: restarted with backoff when they die, shown in readiness."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
from ordermesh_shared.tasks import BackgroundTasks, LoopDown


class Loop:
    """A loop body that raises the errors queued for it, then runs until cancelled."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.runs = 0
        self.running = asyncio.Event()

    async def __call__(self) -> None:
        self.runs += 1
        if self.failures:
            raise self.failures.pop(0)
        self.running.set()
        await asyncio.sleep(3600)


async def until(condition: Callable[[], bool], *, within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_loop_that_dies_is_restarted_and_shown() -> None:
    loop = Loop(asyncpg.InterfaceError("connection is closed"), RuntimeError("a bug"))
    async with BackgroundTasks(backoff=0.01) as tasks:
        task = tasks.supervise(loop, name="relay")
        async with asyncio.timeout(5):
            await loop.running.wait()
        assert loop.runs == 3
        assert not task.done()
        assert await tasks.report() == {
            "relay": {"state": "running", "restarts": 2, "last_error": "RuntimeError: a bug"}
        }
        await tasks.check()  # back within its grace: ready
    assert task.cancelled()
    assert tasks.loops == {}


async def test_a_loop_that_keeps_dying_makes_readiness_fail_after_its_grace() -> None:
    async def broken() -> None:
        raise asyncpg.InternalClientError("protocol state")

    async with BackgroundTasks(grace=0.2, backoff=0.01, backoff_max=0.05) as tasks:
        tasks.supervise(broken, name="saga-recovery")
        await tasks.check()  # within the grace
        await until(lambda: tasks.loops["saga-recovery"].restarts >= 3)
        with pytest.raises(LoopDown, match="saga-recovery restarting"):
            await until_raises(tasks.check)
        report = await tasks.report()
        assert report["saga-recovery"]["last_error"] == "InternalClientError: protocol state"


async def until_raises(check: Callable[[], Awaitable[None]], *, within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while True:
            await check()
            await asyncio.sleep(0.01)


async def test_a_cancellation_from_inside_the_loop_is_a_failure_not_a_shutdown() -> None:
    loop = Loop(asyncio.CancelledError())
    async with BackgroundTasks(backoff=0.01) as tasks:
        tasks.supervise(loop, name="consumer")
        async with asyncio.timeout(5):
            await loop.running.wait()
        assert tasks.loops["consumer"].restarts == 1


async def test_a_loop_that_returns_is_done_and_not_restarted() -> None:
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    async with BackgroundTasks(backoff=0.01) as tasks:
        task = tasks.supervise(once, name="one-off")
        await asyncio.wait_for(task, timeout=5)
        assert runs == 1
        assert await tasks.report() == {}
