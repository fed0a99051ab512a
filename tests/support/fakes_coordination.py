"""An in-memory election for unit tests: contenders in one process, no etcd.

    electorate = InMemoryElectorate()
    relay_a = InMemoryElection(electorate, "relay-a")   # both satisfy LeaderElection
    relay_b = InMemoryElection(electorate, "relay-b")
    ...
    electorate.depose()   # the leader's renewal "fails": its term.lost is set, the next one wins

Contenders are elected in the order they started campaigning, like etcd's; tokens grow from
term to term, like etcd revisions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import NoReturn

from ordermesh_shared.coordination import Term, Work, run_terms


class InMemoryElectorate:
    """The shared state of one election: the queue of contenders and the current term."""

    def __init__(self) -> None:
        self.queue: list[InMemoryElection] = []  # the first one leads
        self.terms: list[Term] = []  # every term ever started, oldest first
        self.changed = asyncio.Condition()
        self._revision = 0

    @property
    def current(self) -> Term | None:
        """The term in progress, if anyone leads."""
        leader = self.queue[0] if self.queue else None
        return None if leader is None else leader.term

    def depose(self) -> None:
        """Make the current leader's term lost, as a failed lease renewal would."""
        if self.current is not None:
            self.current.lost.set()

    def next_token(self) -> int:
        self._revision += 1
        return self._revision

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()


class InMemoryElection:
    """One contender; satisfies ``LeaderElection`` like the etcd ``Election``."""

    def __init__(self, electorate: InMemoryElectorate, value: str) -> None:
        self.electorate = electorate
        self.value = value
        self.term: Term | None = None

    @property
    def is_leader(self) -> bool:
        return self.term is not None and not self.term.lost.is_set()

    @asynccontextmanager
    async def lead(self) -> AsyncIterator[Term]:
        electorate = self.electorate
        electorate.queue.append(self)
        try:
            async with electorate.changed:
                await electorate.changed.wait_for(lambda: electorate.queue[0] is self)
            self.term = Term("fake", self.value, electorate.next_token(), _now(), asyncio.Event())
            electorate.terms.append(self.term)
            await electorate.notify()
            yield self.term
        finally:
            self.term = None
            electorate.queue.remove(self)
            await electorate.notify()

    async def leader(self) -> str | None:
        return self.electorate.queue[0].value if self.electorate.queue else None

    async def observe(self) -> AsyncIterator[str]:
        seen: Term | None = None
        while True:
            seen = await self._next_term(seen)
            if seen is not None:
                yield seen.value

    async def _next_term(self, seen: Term | None) -> Term | None:
        async with self.electorate.changed:
            await self.electorate.changed.wait_for(lambda: self.electorate.current is not seen)
            return self.electorate.current

    async def resign(self) -> None:
        if self.term is not None:
            self.term.lost.set()

    async def run_while_leader(self, work: Work) -> NoReturn:
        await run_terms(self.lead, work, what=f"fake election ({self.value})")


def _now() -> datetime:
    return datetime.now(UTC)
