"""Admin endpoints for the outbox quarantine: see what the relay gave up on, and re-drive it.

Guarded by ``X-Admin-Token``. A quarantined event also holds back the later events of its
aggregate (order is kept), so the listing says how many wait behind each one.

    GET  /admin/outbox/quarantined           -> [{event_id, attempts, last_error, held_behind...}]
    POST /admin/outbox/quarantined/redrive   {"event_ids": [...]}, or {} for all
                                             -> {"redriven": [...]}
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict

from ordermesh_shared.admin import ADMIN_RESPONSES, RequireAdmin
from ordermesh_shared.database import Database
from ordermesh_shared.outbox.store import list_quarantined, redrive


class QuarantinedEvent(BaseModel):
    """One quarantined outbox row."""

    event_id: uuid.UUID
    aggregate_type: str
    aggregate_id: str
    event_type: str
    attempts: int
    last_error: str | None
    created_at: datetime
    quarantined_at: datetime
    held_behind: int


class RedriveRequest(BaseModel):
    """Which quarantined events to try again; all of them when ``event_ids`` is omitted."""

    model_config = ConfigDict(extra="forbid")

    event_ids: list[uuid.UUID] | None = None


class RedriveResult(BaseModel):
    """The events given a fresh set of attempts (ids not quarantined are ignored)."""

    redriven: list[uuid.UUID]


def _db(request: Request) -> Database:
    db: Database = request.app.state.ctx.db
    return db


def outbox_admin_router() -> APIRouter:
    """The quarantine endpoints (they use the running service's database and admin token)."""
    router = APIRouter(
        prefix="/admin/outbox",
        tags=["admin"],
        dependencies=[RequireAdmin],
        responses=ADMIN_RESPONSES,
    )

    @router.get("/quarantined", summary="Events the relay gave up on, oldest first.")
    async def quarantined(
        request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> list[QuarantinedEvent]:
        async with _db(request).pool.acquire() as conn:
            rows = await list_quarantined(conn, limit=limit)
        return [QuarantinedEvent.model_validate(row, from_attributes=True) for row in rows]

    @router.post("/quarantined/redrive", summary="Try quarantined events again.")
    async def redrive_quarantined(request: Request, body: RedriveRequest) -> RedriveResult:
        async with _db(request).pool.acquire() as conn:
            redriven = await redrive(conn, body.event_ids)
        return RedriveResult(redriven=redriven)

    return router
