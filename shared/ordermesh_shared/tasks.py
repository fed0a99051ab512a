"""Background work owned by an ``async with`` block: none outlives its owner, none dies silently.

A long-running loop (relay, consumer, saga heartbeat, registry presence...) is *supervised*:
each loop waits out transient errors itself (see :mod:`ordermesh_shared.transient`); anything
that still escapes it is logged and the loop is started again, with jittered exponential
backoff. ``/health/ready`` shows every loop (``details.background``), and a loop that has not
been running steadily for ``grace`` seconds makes the instance not ready (check
``background``), so a loop that keeps dying is seen, not just logged.

>>> async with BackgroundTasks(grace=10) as tasks:
...     tasks.supervise(relay.run, name="outbox-relay")      # restarted if it dies
...     tasks.start(prepare_database(db, migrations), name="migrate")   # runs once
...     health.add_check("background", tasks.check)
... # leaving the block cancels and awaits every task
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import structlog

log = structlog.get_logger(__name__)

DEFAULT_GRACE = 10.0  # seconds a loop may be down (restarting) before readiness fails
RESTART_BACKOFF = 0.1  # first pause before a restart; doubles per failure in a row
RESTART_BACKOFF_MAX = 10.0


class LoopDown(Exception):
    """A supervised loop has not been running steadily for longer than the grace period."""


@dataclass
class LoopState:
    """What readiness shows of one supervised loop."""

    name: str
    state: str = "running"  # running | restarting
    restarts: int = 0
    last_error: str | None = None
    started_at: float = 0.0  # monotonic time of the current run's start
    down_since: float | None = None  # first failure of the current bad spell

    def down_for(self, now: float, *, steady_after: float) -> float:
        """Seconds the loop has been failing (0 once a run has lasted ``steady_after``)."""
        if self.down_since is None:
            return 0.0
        if self.state == "running" and now - self.started_at >= steady_after:
            return 0.0
        return now - self.down_since

    def as_json(self) -> dict[str, Any]:
        """The loop as ``/health/ready`` details show it."""
        return {"state": self.state, "restarts": self.restarts, "last_error": self.last_error}


class BackgroundTasks:
    """Starts one-shot tasks and supervised loops; cancels and awaits them all on exit."""

    def __init__(
        self,
        *,
        grace: float = DEFAULT_GRACE,
        backoff: float = RESTART_BACKOFF,
        backoff_max: float = RESTART_BACKOFF_MAX,
    ) -> None:
        self.grace = grace
        self._backoff = backoff
        self._backoff_max = backoff_max
        self._tasks: set[asyncio.Task[Any]] = set()
        self.loops: dict[str, LoopState] = {}

    def start(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Run ``coro`` once, until it returns or the block exits; a crash is logged."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def supervise(self, run: Callable[[], Awaitable[Any]], *, name: str) -> asyncio.Task[None]:
        """Run ``run()`` for the life of the block, again (after a backoff) whenever it fails.

        A normal return ends the supervision (the work is done); cancelling the returned
        task stops it for good.
        """
        if name in self.loops:
            raise ValueError(f"a loop named {name!r} is already supervised")
        state = LoopState(name, started_at=time.monotonic())
        self.loops[name] = state
        return self.start(self._supervised(run, state), name=name)

    async def check(self) -> None:
        """Readiness: raises :class:`LoopDown` naming each loop down for longer than grace."""
        now = time.monotonic()
        down = [
            f"{loop.name} {loop.state} after {loop.restarts} failure(s), last: {loop.last_error}"
            for loop in self.loops.values()
            if loop.down_for(now, steady_after=self._steady_after) > self.grace
        ]
        if down:
            raise LoopDown("; ".join(down))

    async def report(self) -> dict[str, Any]:
        """Readiness details: every supervised loop, its state, restarts and last error."""
        return {name: loop.as_json() for name, loop in sorted(self.loops.items())}

    @property
    def _steady_after(self) -> float:
        # A restarted loop that ran this long is healthy again.
        return self.grace / 2

    async def _supervised(self, run: Callable[[], Awaitable[Any]], state: LoopState) -> None:
        failures = 0
        try:
            while True:
                state.state, state.started_at = "running", time.monotonic()
                try:
                    await run()
                except asyncio.CancelledError:
                    if _being_cancelled():
                        raise  # shutdown
                    error = "CancelledError (from inside the loop)"
                    exc_info: BaseException | None = None
                except Exception as exc:
                    error, exc_info = _describe(exc), exc
                else:
                    log.info("background.finished", task=state.name)
                    return
                failures = self._record_failure(state, failures, error)
                delay = self._delay(failures)
                log.error(
                    "background.failed",
                    task=state.name,
                    error=error,
                    restarts=state.restarts,
                    retry_in=round(delay, 3),
                    exc_info=exc_info,
                )
                await asyncio.sleep(delay)
        finally:
            self.loops.pop(state.name, None)

    def _record_failure(self, state: LoopState, failures: int, error: str) -> int:
        now = time.monotonic()
        if now - state.started_at >= self._steady_after:
            failures, state.down_since = 0, None  # it had been running well: a new spell
        if state.down_since is None:
            state.down_since = now
        state.state, state.last_error = "restarting", error
        state.restarts += 1
        return failures + 1

    def _delay(self, failures: int) -> float:
        cap: float = min(self._backoff_max, self._backoff * 2.0 ** (failures - 1))
        return cap * random.uniform(0.5, 1.0)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background.crashed", task=task.get_name(), exc_info=exc)

    async def __aenter__(self) -> BackgroundTasks:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
