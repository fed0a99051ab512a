"""The overview's sagas: those in flight, the parked ones and the most recent, each with its
step log (forward steps, compensations, attempts, last error) as the saga tables hold it."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

import asyncpg
import orjson
from ordermesh_shared.database import DbConn
from pydantic import BaseModel, Field

from order.api import SagaStep

# Bounds on what one refresh reads: the page polls every few seconds.
IN_FLIGHT_LIMIT = 100
PARKED_LIMIT = 50
PARKED = "compensation_failed"

_STEPS = (
    "(SELECT coalesce(json_agg(json_build_object('step', st.step, 'direction', st.direction,"
    "   'status', st.status, 'attempts', st.attempts, 'last_error', st.last_error,"
    "   'started_at', st.started_at, 'finished_at', st.finished_at)"
    "   ORDER BY st.started_at, st.direction DESC), '[]')"
    " FROM saga_steps st WHERE st.saga_id = s.id)::text AS steps"
)
_SAGAS = (
    "SELECT s.id, s.name, s.status, s.failure_reason, s.owner, s.created_at, s.updated_at,"
    f" o.customer_id, {_STEPS}"
    # The saga of an order has the order's id.
    " FROM sagas s LEFT JOIN orders o ON o.id = s.id"
)


class SagaView(BaseModel):
    """A saga and its step timeline; a parked one names the admin call that retries it."""

    id: uuid.UUID
    name: str = Field(examples=["place_order"])
    status: str = Field(examples=["compensation_failed"])
    customer_id: str | None
    failure_reason: str | None
    owner: str | None = Field(description="The order instance running it.")
    created_at: datetime
    updated_at: datetime
    parked: bool = Field(description="compensation_failed: waits for an operator's retry.")
    retry_url: str | None = Field(
        description="POST here with X-Admin-Token to retry the compensation (parked only)."
    )
    steps: list[SagaStep]


class SagasView(BaseModel):
    """In flight (oldest first), parked and most recent (newest first)."""

    status: Literal["ok", "unknown"] = "ok"
    reason: str | None = None
    in_flight: list[SagaView] = []
    parked: list[SagaView] = []
    recent: list[SagaView] = []


RetryPath = Callable[[uuid.UUID], str]


async def in_flight(conn: DbConn) -> list[asyncpg.Record]:
    """Running and compensating sagas, oldest first (the partial index ``sagas_unfinished``)."""
    return await conn.fetch(
        f"{_SAGAS} WHERE s.status IN ('running', 'compensating') ORDER BY s.created_at LIMIT $1",
        IN_FLIGHT_LIMIT,
    )


async def parked(conn: DbConn) -> list[asyncpg.Record]:
    """Parked sagas, newest first: found through the orders' status index, not a scan of
    every saga ever run."""
    return await conn.fetch(
        f"{_SAGAS} WHERE s.id IN (SELECT id FROM orders WHERE status = $1"
        "   ORDER BY created_at DESC, id DESC LIMIT $2) AND s.status = $1"
        " ORDER BY s.created_at DESC",
        PARKED,
        PARKED_LIMIT,
    )


async def recent(conn: DbConn, *, limit: int) -> list[asyncpg.Record]:
    """The ``limit`` newest sagas (through the orders' ``created_at`` index)."""
    return await conn.fetch(
        f"{_SAGAS} WHERE s.id IN (SELECT id FROM orders ORDER BY created_at DESC, id DESC"
        "   LIMIT $1) ORDER BY s.created_at DESC, s.id DESC",
        limit,
    )


async def read_sagas(conn: DbConn, *, recent_limit: int, retry_path: RetryPath) -> SagasView:
    """The three lists, read on one connection."""
    views = [
        [saga_view(row, retry_path) for row in rows]
        for rows in (
            await in_flight(conn),
            await parked(conn),
            await recent(conn, limit=recent_limit),
        )
    ]
    return SagasView(in_flight=views[0], parked=views[1], recent=views[2])


def saga_view(row: Any, retry_path: RetryPath) -> SagaView:
    fields = dict(row)
    steps = orjson.loads(fields.pop("steps"))
    is_parked = fields["status"] == PARKED
    return SagaView(
        **fields,
        parked=is_parked,
        retry_url=retry_path(fields["id"]) if is_parked else None,
        steps=[SagaStep(**step) for step in steps],
    )
