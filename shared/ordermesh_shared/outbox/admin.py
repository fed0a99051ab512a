"""Admin endpoints of the outbox: the quarantine (what the relay gave up on, re-driven on
demand) and the relay's fence (re-based after etcd lost its data; see :mod:`.rebase`).

Guarded by ``X-Admin-Token``. A quarantined event also holds back the later events of its
aggregate (order is kept), so the listing says how many wait behind each one.

    GET  /admin/outbox/quarantined           -> [{event_id, attempts, last_error, held_behind...}]
    POST /admin/outbox/quarantined/redrive   {"event_ids": [...]}, or {} for all
                                             -> {"redriven": [...]}
    GET  /admin/outbox/fence                 -> {stored_token, etcd_revision, etcd_behind, ...}
    POST /admin/outbox/fence/rebase          {"confirm_etcd_reset": true,
                                              "expected_stored_token": 4127}
                                             -> {previous_token, token, etcd_revision}
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from ordermesh_shared.admin import ADMIN_RESPONSES, RequireAdmin
from ordermesh_shared.database import Database
from ordermesh_shared.outbox.rebase import RebaseRefused, RelayFence, read_fence, rebase
from ordermesh_shared.outbox.status import RelayStatus
from ordermesh_shared.outbox.store import list_quarantined, redrive

log = structlog.get_logger(__name__)


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


class FenceStatus(BaseModel):
    """The relay's fence in Postgres beside etcd's revision, and this instance's relay."""

    service: str
    resource: str
    stored_token: int | None
    last_accepted_seconds_ago: float | None
    etcd_url: str
    etcd_revision: int
    etcd_leader: str | None
    etcd_leader_token: int | None
    etcd_behind: bool  # etcd's revision below the stored token: no new term can get in
    rebase_to: int | None  # what a re-base would store (when etcd_behind)
    relay_here: dict[str, Any] | None  # this instance's relay (None: it runs none)


class RebaseRequest(BaseModel):
    """Re-base the fence; ``confirm_etcd_reset`` says no relay of the old etcd is alive."""

    model_config = ConfigDict(extra="forbid")

    confirm_etcd_reset: bool = False
    expected_stored_token: int | None = Field(default=None, ge=1)


class RebaseResult(BaseModel):
    """The fence before and after the re-base."""

    resource: str
    previous_token: int
    token: int
    etcd_revision: int


_FENCE_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "`confirm_etcd_reset` is not true."},
    409: {"description": "Refused (nothing to fix, or not safe yet); `detail` says why."},
}


def _db(request: Request) -> Database:
    db: Database = request.app.state.ctx.db
    return db


def _relay_view(request: Request) -> RelayView:
    view: RelayView = request.app.state.relay_view
    return view


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


@dataclass(frozen=True)
class RelayView:
    """What the fence endpoints look at: the fence (None: the relay runs unfenced) and this
    instance's relay (None: it runs none). Known once the lifespan has started the outbox."""

    site: RelayFence | None
    status: RelayStatus | None


def fence_admin_router(*, quiet: float) -> APIRouter:
    """The fence endpoints of one service; the running relay is read from ``app.state``."""
    router = APIRouter(
        prefix="/admin/outbox/fence",
        tags=["admin"],
        dependencies=[RequireAdmin],
        responses={**ADMIN_RESPONSES, **_FENCE_RESPONSES},
    )

    def fenced_site(request: Request) -> RelayFence:
        site = _relay_view(request).site
        if site is None:
            raise HTTPException(409, "this service's relay runs standalone: it has no fence")
        return site

    @router.get("", summary="The relay's fence beside etcd's revision.")
    async def fence_status(request: Request) -> FenceStatus:
        where = fenced_site(request)
        status = _relay_view(request).status
        try:
            view = await read_fence(_db(request), where)
        except RebaseRefused as exc:
            raise HTTPException(409, str(exc)) from None
        return FenceStatus(
            service=where.service,
            resource=where.resource,
            stored_token=view.stored_token,
            last_accepted_seconds_ago=view.idle_seconds,
            etcd_url=where.etcd_url,
            etcd_revision=view.etcd.revision,
            etcd_leader=view.etcd.leader,
            etcd_leader_token=view.etcd.leader_token,
            etcd_behind=view.etcd_behind,
            rebase_to=view.etcd.rebase_to if view.etcd_behind else None,
            relay_here=None if status is None else await status.as_json(),
        )

    @router.post("/rebase", summary="Re-base the relay's fence after etcd lost its data.")
    async def rebase_fence(request: Request, body: RebaseRequest) -> RebaseResult:
        where = fenced_site(request)
        if not body.confirm_etcd_reset:
            raise HTTPException(
                400, "send confirm_etcd_reset: true once no relay of the old etcd can be alive"
            )
        try:
            view = await rebase(
                _db(request), where, expected=body.expected_stored_token, quiet=quiet
            )
        except RebaseRefused as exc:
            raise HTTPException(409, str(exc)) from None
        assert view.stored_token is not None
        result = RebaseResult(
            resource=where.resource,
            previous_token=view.stored_token,
            token=view.etcd.rebase_to,
            etcd_revision=view.etcd.revision,
        )
        log.warning("outbox.fence_rebased", **result.model_dump())
        return result

    return router
