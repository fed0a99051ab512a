"""The saga engine's SQL: one function per query. Writes check ownership, so a process that
lost its lease (paused, partitioned) cannot move a saga another process has taken over."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from ordermesh_shared.database import DbConn
from ordermesh_shared.saga.definition import FinishWrites


@dataclass(frozen=True, slots=True)
class StepDone:
    """A forward step that succeeded, with its results, recorded with what follows it."""

    step: str
    data: dict[str, Any]


class LostOwnership(Exception):
    """Another process took this saga over; stop working on it."""


@dataclass(frozen=True, slots=True)
class SagaRow:
    """A saga as stored."""

    id: uuid.UUID
    name: str
    status: str
    input: dict[str, Any]
    data: dict[str, Any]
    started_steps: int
    failure_reason: str | None
    value: Any = None  # the typed input, when this process has it (no need to decode)
    # The trace context the saga was created in, stored with its row (None: created outside
    # a trace): a run resumed after a crash, even one before the first step, continues it.
    traceparent: str | None = None


def _row(record: asyncpg.Record) -> SagaRow:
    return SagaRow(
        id=record["id"],
        name=record["name"],
        status=record["status"],
        input=json.loads(record["input"]),
        data=json.loads(record["data"]),
        started_steps=record["started_steps"],
        failure_reason=record["failure_reason"],
        traceparent=record["traceparent"],
    )


def data_json(data: Mapping[str, Any]) -> str:
    # Step results may hold Decimals, UUIDs or datetimes: stored as their text.
    return json.dumps(dict(data), default=str)


async def insert_saga(
    conn: DbConn,
    saga_id: uuid.UUID,
    name: str,
    payload: Mapping[str, Any],
    *,
    owner: str,
    ttl: float,
    traceparent: str | None = None,
) -> None:
    """A new running saga, owned by ``owner``, with the trace it was created in (call inside
    the caller's transaction)."""
    await conn.execute(
        "INSERT INTO sagas (id, name, status, input, owner, lease_until, traceparent)"
        " VALUES ($1, $2, 'running', $3, $4, now() + make_interval(secs => $5), $6)",
        saga_id,
        name,
        json.dumps(payload),
        owner,
        ttl,
        traceparent,
    )


def insert_saga_cte(
    saga_id: uuid.UUID,
    name: str,
    payload: Mapping[str, Any],
    *,
    owner: str,
    ttl: float,
    traceparent: str | None,
    after: str,
    first: int,
) -> tuple[str, list[Any]]:
    """:func:`insert_saga` as a CTE ``saga`` of the caller's statement, written when the CTE
    named ``after`` returned a row (the caller's own row: the order); parameters numbered
    from ``first`` (as many as the list returned holds)."""
    n = first
    sql = (
        "saga AS (INSERT INTO sagas (id, name, status, input, owner, lease_until, traceparent)"
        f" SELECT ${n}, ${n + 1}, 'running', ${n + 2}, ${n + 3},"
        f" now() + make_interval(secs => ${n + 4}), ${n + 5} FROM {after} LIMIT 1)"
    )
    return sql, [saga_id, name, json.dumps(payload), owner, ttl, traceparent]


async def load_saga(conn: DbConn, saga_id: uuid.UUID) -> SagaRow | None:
    """A saga, or None."""
    record = await conn.fetchrow(
        "SELECT id, name, status, input, data, started_steps, failure_reason, traceparent"
        " FROM sagas WHERE id = $1",
        saga_id,
    )
    return _row(record) if record is not None else None


async def step_started(
    conn: DbConn,
    saga_id: uuid.UUID,
    owner: str,
    *,
    step: str,
    direction: str,
    position: int,
    traceparent: str | None = None,
) -> None:
    """Persist "about to run" in one statement (for a forward step: its compensation is now
    registered, as ``started_steps`` covers it); ``traceparent`` is kept if none was."""
    registered = position + 1 if direction == "forward" else 0
    done = await conn.fetchval(
        "WITH owned AS (UPDATE sagas SET started_steps = GREATEST(started_steps, $3),"
        "   traceparent = COALESCE(traceparent, $7),"
        "   updated_at = now() WHERE id = $1 AND owner = $2 RETURNING id)"
        " INSERT INTO saga_steps (saga_id, step, direction, position, status)"
        " SELECT id, $4, $5, $6, 'started' FROM owned"
        " ON CONFLICT (saga_id, step, direction) DO UPDATE SET status = 'started'"
        " RETURNING 1",
        saga_id,
        owner,
        registered,
        step,
        direction,
        position,
        traceparent,
    )
    if done is None:
        raise LostOwnership(f"saga {saga_id} is no longer owned by {owner}")


async def step_succeeded(
    conn: DbConn,
    saga_id: uuid.UUID,
    owner: str,
    *,
    step: str,
    direction: str,
    data: Mapping[str, Any],
) -> None:
    """Count the successful attempt, mark the step succeeded and keep its results: one
    statement, so a step's end is recorded whole or not at all."""
    done = await conn.fetchval(
        "WITH owned AS (UPDATE sagas SET data = data || $3::jsonb, updated_at = now()"
        "   WHERE id = $1 AND owner = $2 RETURNING id)"
        " UPDATE saga_steps SET status = 'succeeded', attempts = attempts + 1,"
        "   finished_at = now()"
        " WHERE saga_id = (SELECT id FROM owned) AND step = $4 AND direction = $5 RETURNING 1",
        saga_id,
        owner,
        data_json(data),
        step,
        direction,
    )
    if done is None:
        raise LostOwnership(f"saga {saga_id} is no longer owned by {owner}")


# The saga $1 is still owned by $2: a step-log write of a process that lost it changes nothing.
_OWNED = "EXISTS (SELECT 1 FROM sagas WHERE id = $1 AND owner = $2)"

# Forward step $4 of the saga just updated in an ``owned`` CTE succeeded (its attempt counted).
_FORWARD_STEP_DONE = (
    "UPDATE saga_steps SET status = 'succeeded', attempts = attempts + 1, finished_at = now()"
    " WHERE saga_id = (SELECT id FROM owned) AND step = $4 AND direction = 'forward'"
)


async def step_advanced(
    conn: DbConn,
    saga_id: uuid.UUID,
    owner: str,
    *,
    done: str,
    data: Mapping[str, Any],
    step: str,
    position: int,
    traceparent: str | None = None,
) -> None:
    """Forward step ``done`` succeeded (with ``data``) and ``step`` is about to run: the
    end of one step and the start of the next in one statement (one round trip, all or
    nothing)."""
    ok = await conn.fetchval(
        "WITH owned AS (UPDATE sagas SET data = data || $3::jsonb,"
        "   started_steps = GREATEST(started_steps, $6 + 1),"
        "   traceparent = COALESCE(traceparent, $7), updated_at = now()"
        "   WHERE id = $1 AND owner = $2 RETURNING id),"
        f" done AS ({_FORWARD_STEP_DONE})"
        " INSERT INTO saga_steps (saga_id, step, direction, position, status)"
        " SELECT id, $5, 'forward', $6, 'started' FROM owned"
        " ON CONFLICT (saga_id, step, direction) DO UPDATE SET status = 'started'"
        " RETURNING 1",
        saga_id,
        owner,
        data_json(data),
        done,
        step,
        position,
        traceparent,
    )
    if ok is None:
        raise LostOwnership(f"saga {saga_id} is no longer owned by {owner}")


async def attempt_made(
    conn: DbConn,
    saga_id: uuid.UUID,
    owner: str,
    *,
    step: str,
    direction: str,
    error: str | None,
) -> None:
    """Count an attempt and keep its error (None when it succeeded)."""
    done = await conn.fetchval(
        "UPDATE saga_steps SET attempts = attempts + 1, last_error = COALESCE($5, last_error)"
        f" WHERE saga_id = $1 AND step = $3 AND direction = $4 AND {_OWNED} RETURNING 1",
        saga_id,
        owner,
        step,
        direction,
        error,
    )
    if done is None:
        raise LostOwnership(f"saga {saga_id} is no longer owned by {owner}")


async def step_finished(
    conn: DbConn, saga_id: uuid.UUID, owner: str, *, step: str, direction: str, status: str
) -> None:
    """Persist a step's end: succeeded, rejected (a business no) or failed (gave up)."""
    done = await conn.fetchval(
        "UPDATE saga_steps SET status = $5, finished_at = now()"
        f" WHERE saga_id = $1 AND step = $3 AND direction = $4 AND {_OWNED} RETURNING 1",
        saga_id,
        owner,
        step,
        direction,
        status,
    )
    if done is None:
        raise LostOwnership(f"saga {saga_id} is no longer owned by {owner}")


async def set_status(
    conn: DbConn, saga_id: uuid.UUID, owner: str, status: str, reason: str | None
) -> str | None:
    """Move the saga to ``status``, keeping the first failure reason; returns that reason."""
    row = await conn.fetchrow(
        "UPDATE sagas SET status = $3, failure_reason = COALESCE(failure_reason, $4),"
        " updated_at = now() WHERE id = $1 AND owner = $2 RETURNING failure_reason",
        saga_id,
        owner,
        status,
        reason,
    )
    if row is None:
        raise LostOwnership(f"saga {saga_id} is no longer owned by {owner}")
    first: str | None = row["failure_reason"]
    return first


async def finish_saga(
    conn: DbConn,
    saga_id: uuid.UUID,
    owner: str,
    *,
    status: str,
    reason: str | None,
    done: StepDone | None,
    writes: FinishWrites | None,
) -> str | None:
    """End the saga (with ``done``: its last forward step succeeded) and write ``writes``
    with it: one statement, all or nothing. Returns the first failure reason; raises
    :class:`LostOwnership` (nothing written) when the saga or its step is not this owner's."""
    if done is None:
        head = (
            "WITH owned AS (UPDATE sagas SET status = $3,"
            "   failure_reason = COALESCE(failure_reason, $4), updated_at = now()"
            "   WHERE id = $1 AND owner = $2 RETURNING id, failure_reason)"
        )
        args: list[Any] = [saga_id, owner, status, reason]
        after, where = "owned", ""
    else:
        head = (
            "WITH owned AS (UPDATE sagas SET data = data || $5::jsonb, status = $3,"
            "   failure_reason = COALESCE(failure_reason, $4), updated_at = now()"
            "   WHERE id = $1 AND owner = $2 RETURNING id, failure_reason),"
            " done AS (UPDATE saga_steps SET status = 'succeeded', attempts = attempts + 1,"
            "   finished_at = now() WHERE saga_id = (SELECT id FROM owned) AND step = $6"
            "   AND direction = 'forward' RETURNING saga_id AS id)"
        )
        args = [saga_id, owner, status, reason, data_json(done.data), done.step]
        after, where = "done", " WHERE EXISTS (SELECT 1 FROM done)"
    ctes, select = "", ""
    if writes is not None:
        more, more_args = writes.ctes(after, len(args) + 1)
        ctes, select = f", {more}", f", {writes.select} AS written"
        args += more_args
    row = await conn.fetchrow(
        f"{head}{ctes} SELECT failure_reason{select} FROM owned{where}", *args
    )
    if row is None:
        raise LostOwnership(f"saga {saga_id} is no longer owned by {owner}")
    first: str | None = row["failure_reason"]
    return first


async def step_statuses(conn: DbConn, saga_id: uuid.UUID) -> dict[tuple[str, str], str]:
    """(step, direction) -> status for every logged step."""
    rows = await conn.fetch(
        "SELECT step, direction, status FROM saga_steps WHERE saga_id = $1", saga_id
    )
    return {(r["step"], r["direction"]): r["status"] for r in rows}


async def step_log(conn: DbConn, saga_id: uuid.UUID) -> list[asyncpg.Record]:
    """The step history, in the order things happened."""
    return await conn.fetch(
        "SELECT step, direction, status, attempts, last_error, started_at, finished_at"
        " FROM saga_steps WHERE saga_id = $1 ORDER BY started_at, direction DESC",
        saga_id,
    )


async def renew_leases(conn: DbConn, owner: str, ttl: float) -> None:
    """Keep this process's unfinished sagas from being taken over."""
    await conn.execute(
        "UPDATE sagas SET lease_until = now() + make_interval(secs => $2)"
        " WHERE owner = $1 AND status IN ('running', 'compensating')",
        owner,
        ttl,
    )


async def claim_orphans(
    conn: DbConn, owner: str, *, instance: str, ttl: float, limit: int = 50
) -> list[uuid.UUID]:
    """Take over unfinished sagas whose owner's lease lapsed, or whose owner was an earlier
    run of this very instance (it restarted, so it is dead: no need to wait for the lease).

    The instance id is compared literally (``starts_with``, not ``LIKE``): an id holding
    ``_``, ``%`` or ``\\`` must not match, and so take over, another live instance's sagas."""
    rows = await conn.fetch(
        "UPDATE sagas SET owner = $1, lease_until = now() + make_interval(secs => $3)"
        " WHERE id IN (SELECT id FROM sagas WHERE status IN ('running', 'compensating')"
        "   AND (lease_until < now() OR (starts_with(owner, $2 || '/') AND owner <> $1))"
        "   ORDER BY created_at LIMIT $4 FOR UPDATE SKIP LOCKED)"
        " RETURNING id",
        owner,
        instance,
        ttl,
        limit,
    )
    return [r["id"] for r in rows]


async def own_unfinished(conn: DbConn, owner: str) -> list[uuid.UUID]:
    """Unfinished sagas this very process owns (some may have no task running any more)."""
    rows = await conn.fetch(
        "SELECT id FROM sagas WHERE owner = $1 AND status IN ('running', 'compensating')",
        owner,
    )
    return [r["id"] for r in rows]


async def reopen_parked(conn: DbConn, saga_id: uuid.UUID, owner: str, ttl: float) -> bool:
    """Put a parked (compensation_failed) saga back to compensating, owned by ``owner``."""
    done = await conn.fetchval(
        "UPDATE sagas SET status = 'compensating', owner = $2,"
        " lease_until = now() + make_interval(secs => $3), updated_at = now()"
        " WHERE id = $1 AND status = 'compensation_failed' RETURNING 1",
        saga_id,
        owner,
        ttl,
    )
    return done is not None


# -- the store the engine talks to ---------------------------------------------------------


class SagaStore(Protocol):
    """Where the engine keeps sagas and their step logs. Every write names the owner and
    raises :class:`LostOwnership` when the saga is not (or no longer) that owner's.

    :class:`PostgresSagaStore` is the real one; :class:`~ordermesh_shared.saga.memory.
    InMemorySagaStore` keeps the same rules in a dict, for unit tests of the engine."""

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
        """A new running saga, in the caller's transaction (``conn``), with the trace it was
        created in."""

    async def load(self, saga_id: uuid.UUID) -> SagaRow | None:
        """A saga, or None."""

    async def statuses(self, saga_id: uuid.UUID) -> dict[tuple[str, str], str]:
        """(step, direction) -> status for every logged step."""

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
        """``step`` is about to run (with ``done``: the step before it succeeded); the saga
        keeps ``traceparent`` unless it has one."""

    async def step_succeeded(
        self,
        saga_id: uuid.UUID,
        owner: str,
        *,
        step: str,
        direction: str,
        data: Mapping[str, Any],
    ) -> None:
        """A step succeeded, with its results."""

    async def attempt_made(
        self, saga_id: uuid.UUID, owner: str, *, step: str, direction: str, error: str
    ) -> None:
        """A failed attempt, counted with its error."""

    async def step_finished(
        self, saga_id: uuid.UUID, owner: str, *, step: str, direction: str, status: str
    ) -> None:
        """A step ended without success: rejected or failed."""

    async def set_status(
        self, saga_id: uuid.UUID, owner: str, status: str, reason: str | None
    ) -> str | None:
        """Move the saga to ``status``; returns the first failure reason."""

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
        """End the saga (with ``done``: its last step's success) together with the service's
        ``writes``, all or nothing; returns the first failure reason."""

    async def renew_leases(self, owner: str, ttl: float) -> None:
        """Keep the owner's unfinished sagas."""

    async def claim_orphans(self, owner: str, *, instance: str, ttl: float) -> list[uuid.UUID]:
        """Take over unfinished sagas whose lease lapsed or whose owner was an earlier run
        of ``instance``."""

    async def own_unfinished(self, owner: str) -> list[uuid.UUID]:
        """Unfinished sagas the owner holds."""

    async def reopen(self, conn: Any, saga_id: uuid.UUID, owner: str, ttl: float) -> bool:
        """A parked saga back to compensating, in the caller's transaction."""


class PostgresSagaStore:
    """The saga store on Postgres: each call one statement on a pooled connection (``finish``
    one transaction), the SQL in the functions above."""

    def __init__(self, pool: Callable[[], asyncpg.Pool]) -> None:
        # Called per use: a Database hands out its pool only once migrated.
        self._pool = pool

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
        await insert_saga(
            conn, saga_id, name, payload, owner=owner, ttl=ttl, traceparent=traceparent
        )

    async def load(self, saga_id: uuid.UUID) -> SagaRow | None:
        async with self._pool().acquire() as conn:
            return await load_saga(conn, saga_id)

    async def statuses(self, saga_id: uuid.UUID) -> dict[tuple[str, str], str]:
        async with self._pool().acquire() as conn:
            return await step_statuses(conn, saga_id)

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
        async with self._pool().acquire() as conn:
            if done is None:
                await step_started(
                    conn,
                    saga_id,
                    owner,
                    step=step,
                    direction=direction,
                    position=position,
                    traceparent=traceparent,
                )
            else:  # one round trip for the end of one step and the start of the next
                await step_advanced(
                    conn,
                    saga_id,
                    owner,
                    done=done.step,
                    data=done.data,
                    step=step,
                    position=position,
                    traceparent=traceparent,
                )

    async def step_succeeded(
        self,
        saga_id: uuid.UUID,
        owner: str,
        *,
        step: str,
        direction: str,
        data: Mapping[str, Any],
    ) -> None:
        async with self._pool().acquire() as conn:
            await step_succeeded(conn, saga_id, owner, step=step, direction=direction, data=data)

    async def attempt_made(
        self, saga_id: uuid.UUID, owner: str, *, step: str, direction: str, error: str
    ) -> None:
        async with self._pool().acquire() as conn:
            await attempt_made(conn, saga_id, owner, step=step, direction=direction, error=error)

    async def step_finished(
        self, saga_id: uuid.UUID, owner: str, *, step: str, direction: str, status: str
    ) -> None:
        async with self._pool().acquire() as conn:
            await step_finished(conn, saga_id, owner, step=step, direction=direction, status=status)

    async def set_status(
        self, saga_id: uuid.UUID, owner: str, status: str, reason: str | None
    ) -> str | None:
        async with self._pool().acquire() as conn:
            return await set_status(conn, saga_id, owner, status, reason)

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
        async with self._pool().acquire() as conn:  # one statement: no transaction to open
            return await finish_saga(
                conn, saga_id, owner, status=status, reason=reason, done=done, writes=writes
            )

    async def renew_leases(self, owner: str, ttl: float) -> None:
        async with self._pool().acquire() as conn:
            await renew_leases(conn, owner, ttl)

    async def claim_orphans(self, owner: str, *, instance: str, ttl: float) -> list[uuid.UUID]:
        async with self._pool().acquire() as conn:
            return await claim_orphans(conn, owner, instance=instance, ttl=ttl)

    async def own_unfinished(self, owner: str) -> list[uuid.UUID]:
        async with self._pool().acquire() as conn:
            return await own_unfinished(conn, owner)

    async def reopen(self, conn: Any, saga_id: uuid.UUID, owner: str, ttl: float) -> bool:
        return await reopen_parked(conn, saga_id, owner, ttl)
