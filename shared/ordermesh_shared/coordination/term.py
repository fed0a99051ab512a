"""Leadership terms, the ``LeaderElection`` port, and the loop that runs work while leading.

:func:`run_terms` is the heart of ``run_while_leader``; it only needs a way to enter a term,
so the etcd election and the in-memory fake for tests share it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn, Protocol

import structlog

from ordermesh_shared.coordination.errors import CoordinationError
from ordermesh_shared.coordination.lease import Backoff

log = structlog.get_logger(__name__)

# Work still running this long after being cancelled is stuck; say so (and keep waiting).
_STUCK_WORK_WARNING = 5.0


@dataclass(frozen=True, eq=False, slots=True)
class Term:
    """One continuous leadership of one contender.

    ``token`` is the fencing token (the leader key's etcd revision; it grows from one term
    to the next); ``lost`` is set when the term is over or may be over (renewal failed, or
    resigned): stop leader work. ``since`` is when the election was won (UTC).
    """

    name: str
    value: str
    token: int
    since: datetime
    lost: asyncio.Event


Work = Callable[[Term], Awaitable[None]]


class LeaderElection(Protocol):
    """What leader-only components need from an election (etcd, or a fake in tests)."""

    @property
    def is_leader(self) -> bool: ...

    def lead(self) -> AbstractAsyncContextManager[Term]: ...

    async def leader(self) -> str | None: ...

    def observe(self) -> AsyncIterator[str]: ...

    async def resign(self) -> None: ...

    async def run_while_leader(self, work: Work) -> NoReturn: ...


async def run_terms(
    lead: Callable[[], AbstractAsyncContextManager[Term]], work: Work, *, what: str
) -> NoReturn:
    """Forever: win a term, run ``work(term)`` until the term is lost or work ends, step down.

    Failures to campaign (etcd down) and work that returns or raises are logged and followed
    by a backoff that grows while they repeat. Cancel the caller's task to stop: the current
    work is cancelled and awaited, and leadership is resigned.
    """
    backoff = Backoff()
    while True:
        try:
            async with lead() as term:
                served = await serve_term(term, work, what=what)
        except CoordinationError as exc:
            log.warning("election.campaign_failed", election=what, error=str(exc))
        else:
            if served >= backoff.cap:  # a term that lasted: this is not a failure loop
                backoff.reset()
        await backoff.sleep()


async def serve_term(term: Term, work: Work, *, what: str) -> float:
    """Run ``work(term)`` until it ends or ``term.lost`` is set; returns how long it ran."""
    started = time.monotonic()
    task = asyncio.create_task(_perform(work, term), name=f"{what}: leader work")
    watcher: asyncio.Future[Any] = asyncio.create_task(term.lost.wait(), name=f"{what}: watch")
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Lost: step down now, while the rest of the lease still keeps others out.
        watcher.cancel()
        task.cancel()
        await _reap(task, what=what)
        await asyncio.wait({watcher})
        _report(task, term, what=what)
    return time.monotonic() - started


async def _perform(work: Work, term: Term) -> None:
    await work(term)


async def _reap(task: asyncio.Future[Any], *, what: str) -> None:
    _, pending = await asyncio.wait({task}, timeout=_STUCK_WORK_WARNING)
    if pending:
        log.error("election.work_ignores_cancel", election=what, waited=_STUCK_WORK_WARNING)
        await asyncio.wait(pending)


def _report(task: asyncio.Future[None], term: Term, *, what: str) -> None:
    fields = {"election": what, "token": term.token}
    if task.cancelled():
        log.info("election.work_stopped", lost=term.lost.is_set(), **fields)
    elif (exc := task.exception()) is not None:
        log.error("election.work_failed", exc_info=exc, **fields)
    else:
        log.warning("election.work_returned", **fields)
