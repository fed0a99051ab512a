"""A saga store in memory, with the Postgres store's rules: for unit tests of the engine
(compensation order, recovery at every step boundary, the pivot, parking) without a database.

It follows :class:`~ordermesh_shared.saga.store.PostgresSagaStore` write for write, ownership
checks included; ``tests/integration/test_saga_store_contract.py`` runs the same checks on
both. Leases run on ``clock`` (monotonic seconds), so a test can let one lapse at once.

>>> store = InMemorySagaStore()
>>> engine = SagaEngine(None, owner="order-1", definitions=[trip], store=store)
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ordermesh_shared.saga.definition import FinishWrites
from ordermesh_shared.saga.store import LostOwnership, SagaRow, StepDone, data_json

UNFINISHED = ("running", "compensating")


@dataclass
class StoredSaga:
    """One saga as the in-memory store keeps it."""

    id: uuid.UUID
    name: str
    input: dict[str, Any]
    owner: str
    lease_until: float
    created: int  # insertion order: orphans are claimed oldest first, as in Postgres
    status: str = "running"
    data: dict[str, Any] = field(default_factory=dict)
    started_steps: int = 0
    failure_reason: str | None = None
    traceparent: str | None = None


@dataclass
class StoredStep:
    """One step-log entry."""

    position: int
    status: str = "started"
    attempts: int = 0
    last_error: str | None = None


class InMemorySagaStore:
    """Sagas and step logs in dicts; every write checks ownership like the SQL does."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.sagas: dict[uuid.UUID, StoredSaga] = {}
        self.steps: dict[tuple[uuid.UUID, str, str], StoredStep] = {}
        self.writes: list[FinishWrites] = []  # what the sagas' ends asked to write

    def log(self, saga_id: uuid.UUID) -> dict[tuple[str, str], StoredStep]:
        """The step log of one saga, by (step, direction)."""
        return {(s, d): entry for (i, s, d), entry in self.steps.items() if i == saga_id}

    async def insert(
        self,
        conn: Any,
        saga_id: uuid.UUID,
        name: str,
        payload: Mapping[str, Any],
        *,
        owner: str,
        ttl: float,
        traceparent: str | None = None,
    ) -> None:
        if saga_id in self.sagas:
            raise ValueError(f"saga {saga_id} exists")  # the primary key would refuse it
        lease = self.clock() + ttl
        created = len(self.sagas)
        saga = StoredSaga(
            saga_id, name, dict(payload), owner, lease, created, traceparent=traceparent
        )
        self.sagas[saga_id] = saga

    async def load(self, saga_id: uuid.UUID) -> SagaRow | None:
        saga = self.sagas.get(saga_id)
        if saga is None:
            return None
        return SagaRow(
            saga.id,
            saga.name,
            saga.status,
            copy.deepcopy(saga.input),
            copy.deepcopy(saga.data),
            saga.started_steps,
            saga.failure_reason,
            traceparent=saga.traceparent,
        )

    async def statuses(self, saga_id: uuid.UUID) -> dict[tuple[str, str], str]:
        return {key: entry.status for key, entry in self.log(saga_id).items()}

    async def step_started(
        self,
        saga_id: uuid.UUID,
        owner: str,
        *,
        step: str,
        direction: str,
        position: int,
        done: StepDone | None = None,
        traceparent: str | None = None,
    ) -> None:
        saga = self._owned(saga_id, owner)
        saga.traceparent = saga.traceparent or traceparent
        if done is not None:
            saga.data.update(_as_stored(done.data))
            finished = self.steps.get((saga_id, done.step, "forward"))
            if finished is not None:
                finished.status, finished.attempts = "succeeded", finished.attempts + 1
        registered = position + 1 if direction == "forward" else 0
        saga.started_steps = max(saga.started_steps, registered)
        entry = self.steps.setdefault((saga_id, step, direction), StoredStep(position))
        entry.status = "started"

    async def step_succeeded(
        self,
        saga_id: uuid.UUID,
        owner: str,
        *,
        step: str,
        direction: str,
        data: Mapping[str, Any],
    ) -> None:
        saga = self._owned(saga_id, owner)
        entry = self._entry(saga_id, owner, step, direction)
        saga.data.update(_as_stored(data))
        entry.status, entry.attempts = "succeeded", entry.attempts + 1

    async def attempt_made(
        self, saga_id: uuid.UUID, owner: str, *, step: str, direction: str, error: str
    ) -> None:
        entry = self._entry(saga_id, owner, step, direction)
        entry.attempts, entry.last_error = entry.attempts + 1, error

    async def step_finished(
        self, saga_id: uuid.UUID, owner: str, *, step: str, direction: str, status: str
    ) -> None:
        self._entry(saga_id, owner, step, direction).status = status

    async def set_status(
        self, saga_id: uuid.UUID, owner: str, status: str, reason: str | None
    ) -> str | None:
        saga = self._owned(saga_id, owner)
        saga.status = status
        saga.failure_reason = saga.failure_reason or reason
        return saga.failure_reason

    async def finish(
        self,
        saga_id: uuid.UUID,
        owner: str,
        *,
        status: str,
        reason: str | None,
        done: StepDone | None,
        writes: FinishWrites | None,
    ) -> str | None:
        # All or nothing, as the Postgres store's one statement. ``writes`` are SQL for the
        # service's own tables: this store has none, so they are kept to be looked at.
        before = copy.deepcopy((self.sagas, self.steps))
        try:
            if done is not None:
                await self.step_succeeded(
                    saga_id, owner, step=done.step, direction="forward", data=done.data
                )
            first = await self.set_status(saga_id, owner, status, reason)
        except BaseException:
            self.sagas, self.steps = before
            raise
        if writes is not None:
            self.writes.append(writes)
        return first

    async def renew_leases(self, owner: str, ttl: float) -> None:
        for saga in self.sagas.values():
            if saga.owner == owner and saga.status in UNFINISHED:
                saga.lease_until = self.clock() + ttl

    async def claim_orphans(self, owner: str, *, instance: str, ttl: float) -> list[uuid.UUID]:
        now = self.clock()
        claimed = []
        for saga in sorted(self.sagas.values(), key=lambda s: s.created)[:50]:
            predecessor = saga.owner.startswith(f"{instance}/") and saga.owner != owner
            if saga.status in UNFINISHED and (saga.lease_until < now or predecessor):
                saga.owner, saga.lease_until = owner, now + ttl
                claimed.append(saga.id)
        return claimed

    async def own_unfinished(self, owner: str) -> list[uuid.UUID]:
        return [s.id for s in self.sagas.values() if s.owner == owner and s.status in UNFINISHED]

    async def reopen(self, conn: Any, saga_id: uuid.UUID, owner: str, ttl: float) -> bool:
        saga = self.sagas.get(saga_id)
        if saga is None or saga.status != "compensation_failed":
            return False
        saga.status, saga.owner, saga.lease_until = "compensating", owner, self.clock() + ttl
        return True

    def _owned(self, saga_id: uuid.UUID, owner: str) -> StoredSaga:
        saga = self.sagas.get(saga_id)
        if saga is None or saga.owner != owner:
            raise LostOwnership(f"saga {saga_id} is no longer owned by {owner}")
        return saga

    def _entry(self, saga_id: uuid.UUID, owner: str, step: str, direction: str) -> StoredStep:
        self._owned(saga_id, owner)
        entry = self.steps.get((saga_id, step, direction))
        if entry is None:  # the SQL's UPDATE finds no row: reported as lost, like it
            raise LostOwnership(f"saga {saga_id} has no {direction} step {step}")
        return entry


def _as_stored(data: Mapping[str, Any]) -> dict[str, Any]:
    # Postgres keeps step results as JSON (Decimals, UUIDs as their text): so does this.
    stored: dict[str, Any] = json.loads(data_json(data))
    return stored
